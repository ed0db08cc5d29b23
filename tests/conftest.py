"""Shared fixtures: tiny randomly initialised Llama models built in code (no downloads)."""

from __future__ import annotations

import random
import subprocess

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hamburger.model import HAMburgerConfig, HAMburgerModel, Sample

# ---------------------------------------------------------------------------- markers match what a test does
# A test (or a fixture it sets up) that starts one of the project's commands in a process (the
# deepspeed launcher, `python -m trainer...`/`data_prep...`, launch.sh) must be marked
# `distributed`, so `./launch.sh test -m "not distributed"` is the fast, in-process loop.
_COMMANDS = ("deepspeed", "launch.sh", "trainer.", "data_prep.")
_started: list[str] = []
_real_popen_init = subprocess.Popen.__init__


def _recording_popen_init(self, args, *rest, **kw):
    argv = [args] if isinstance(args, str | bytes) else [str(a) for a in args]
    if any(c in " ".join(map(str, argv)) for c in _COMMANDS):
        _started.append(" ".join(map(str, argv))[:120])
    _real_popen_init(self, args, *rest, **kw)


subprocess.Popen.__init__ = _recording_popen_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _started.clear()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if _started and item.get_closest_marker("distributed") is None:
        raise AssertionError(
            f"{item.nodeid} starts the project's commands in processes ({_started[0]!r}) but is not "
            "marked `distributed`"
        )
    return result


TINY_SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
"""The tests' tiny decoder shape, for a config of any family."""


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = {**TINY_SHAPE, **overrides}
    config = LlamaConfig(**cfg)
    config._attn_implementation = overrides.get("attn_implementation", "sdpa")
    return config


def tiny_base(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_hamburger(seed: int = 0, randomize: bool = True, **hcfg) -> HAMburgerModel:
    """A tiny model; randomize=True also perturbs zero-initialised weights so every path matters."""
    base = tiny_base(seed)
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=2, **hcfg))
    if randomize:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            model.embedder.o_proj.weight.normal_(0, 0.05)
            model.stop_head.net[-1].bias.normal_(0, 1.0)
    return model.eval()


def sharp_model() -> HAMburgerModel:
    """A tiny model with confident stop decisions and a peaked base, in float64 (padding and
    batching then change nothing but rounding): decoders must agree on it token for token."""
    model = tiny_hamburger(seed=3)
    with torch.no_grad():
        torch.manual_seed(5)
        for layer in model.stop_head.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5)
        for p in model.base.parameters():
            p.mul_(3.0)
    return model.double()


def random_sample(
    rng: random.Random, vocab: int, max_segment_len: int, prompt_len: int, n_resp: int, sid: int = 0
):
    ids = [rng.randrange(3, vocab) for _ in range(prompt_len + n_resp)]
    segs, left = [], n_resp
    while left:
        s = rng.randint(1, min(max_segment_len, left))
        segs.append(s)
        left -= s
    return Sample(input_ids=ids, prompt_len=prompt_len, seg_lens=segs, sample_id=sid)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; no test inherits another's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


# Session fixtures of the launcher-based tests (one trained tiny model shared by several files).
from launcher import baseline, setup  # noqa: E402, F401
