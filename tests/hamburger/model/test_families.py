"""The family matrix: every base family either runs exactly like the base (one-token segments
reproduce its teacher-forced logits and its greedy tokens) or is refused by name when the model
is built. Tiny random configs of the families the installed transformers has."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import TINY_SHAPE, random_sample

from hamburger.decode import generate
from hamburger.model import HAMburgerConfig, HAMburgerModel, collate
from hamburger.model.families import UnsupportedBase

COMMON = TINY_SHAPE
SUPPORTED = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2 (qkv bias)": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3 (q/k norms, head_dim)": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral (window past the context)": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "mistral (no window)": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3 (no window)": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
}
REFUSED = {
    "mistral (window 8)": (
        "MistralConfig",
        "MistralForCausalLM",
        {"sliding_window": 8},
        "sliding-window attention",
    ),
    "qwen2 (sliding window on)": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
        "sliding-window attention",
    ),
    "phi3 (window 2047)": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"sliding_window": 2047, "max_position_embeddings": 4096},
        "sliding-window attention",
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, "input embeddings scaled"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, "softcapping"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, "input embeddings scaled"),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        "mixture-of-experts",
    ),
}


def _base(config_cls: str, model_cls: str, extra: dict):
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra})).eval()


@pytest.mark.parametrize("family", SUPPORTED)
def test_a_supported_family_runs_exactly_like_its_base(family):
    base = _base(*SUPPORTED[family])
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1)).eval()
    s = random_sample(random.Random(0), 96, 1, 6, 40)  # every segment one token
    with torch.no_grad():
        out = model(collate([s], 4), return_logits=True)
        plain = base(input_ids=torch.tensor([s.input_ids])).logits[0, s.prompt_len - 1 : -1].float()
        torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
        ours = generate(model, s.input_ids[:6], 12, 1.0, set()).tokens  # c = 1: one token per step
        theirs = base.generate(
            torch.tensor([s.input_ids[:6]]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=2,
        )[0, 6:]
    assert ours == theirs.tolist()


@pytest.mark.parametrize("family", REFUSED)
def test_a_family_with_a_trait_not_reproduced_is_refused_by_name(family):
    *spec, trait = REFUSED[family]
    base = _base(*spec)
    with pytest.raises(
        UnsupportedBase, match=rf"base model family '{base.config.model_type}' is not supported: .*{trait}"
    ):
        HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1))
