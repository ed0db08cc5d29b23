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


def _greedy(base, prompt: list[int], n: int) -> list[int]:
    out = base.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", SUPPORTED)
def test_static_and_rehearsed_graphed_decoding_give_the_base_greedy_tokens(family, monkeypatch):
    """c = 1 through the static decoders (and through a rehearsed CUDA-graph capture, as on a
    GPU): every family's greedy tokens equal the base's own generate()."""
    from hamburger.decode import base_generate_batch, generate_batch
    from hamburger.decode import static as static_decode

    base = _base(*SUPPORTED[family])
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1)).eval()
    prompts = [[5, 17, 33, 8, 61, 12], [9, 4, 70]]
    want = [_greedy(base, p, 10) for p in prompts]
    with torch.no_grad():
        assert [r.tokens for r in generate_batch(model, prompts, 10, 1.0, decode="static")] == want
        assert [r.tokens for r in base_generate_batch(base, prompts, 10, decode="static")] == want

        def rehearse(fn, prepare, device):
            for _ in range(3):
                prepare()
                fn()

        monkeypatch.setattr(static_decode, "capture", rehearse)
        graphed = static_decode.StaticHAMburgerDecoder(model, len(prompts), 6, 10, graphs=True)
        assert [r.tokens for r in graphed.generate(prompts, set(), 1.0)] == want


@pytest.mark.parametrize("family", SUPPORTED)
def test_packed_training_equals_unpacked_training(family):
    """Two samples packed in one row give each the logits, stop logits and loss it gets alone."""
    base = _base(*SUPPORTED[family])
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1)).eval()
    rng = random.Random(1)
    samples = [random_sample(rng, 96, 4, 5, 23, sid=0), random_sample(rng, 96, 4, 7, 17, sid=1)]
    with torch.no_grad():
        packed = model(collate(samples, 4, row_capacity=200), return_logits=True)
        alone = [model(collate([s], 4), return_logits=True) for s in samples]
    assert collate(samples, 4, row_capacity=200).seq_ids.shape[0] == 1
    torch.testing.assert_close(packed.logits, torch.cat([a.logits for a in alone]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", SUPPORTED)
def test_labelling_reads_the_logits_the_base_produces(family):
    """The scorer (base hidden states through the LM head, chunked, padded batches) gives the
    entropy and target probability of the base's own forward."""
    from data_prep.label import Scorer

    base = _base(*SUPPORTED[family])
    rng = random.Random(2)
    rows = [([rng.randrange(3, 96) for _ in range(n)], p) for n, p in ((30, 6), (17, 4), (24, 9))]
    scores = Scorer(base, torch.device("cpu"), chunk_elements=96 * 5).score(rows, batch_tokens=64)
    for (ids, p), sc in zip(rows, scores, strict=True):
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids])).logits[0, p - 1 : -1].float()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        prob = logp.gather(1, torch.tensor(ids[p:])[:, None]).squeeze(1).exp()
        torch.testing.assert_close(torch.from_numpy(sc.entropy), entropy, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(sc.prob), prob, atol=1e-5, rtol=1e-4)
