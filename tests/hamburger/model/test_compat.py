"""The KV caches are really used, under whichever transformers is installed.

transformers renamed the decoders' cache argument (`past_key_values` -> `cache` in 5.24) and
every forward swallows unknown keywords, so a wrong name decodes without a cache and raises
nothing. These tests fail in that case: the cache must grow by one entry per step, and cached
decoding must equal recomputation from scratch without any cache.
Run them on another version with `PYTHONPATH=/tmp/tf517 pytest tests/hamburger/model/test_compat.py` (passes on
4.56.2, 5.17.0 and 5.24.0).
"""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_model, tiny_hamburger
from transformers import DynamicCache

import hamburger.decode.eager as decode_mod
import hamburger.decode.steppers as batched_mod  # the batched decoders build their caches there
from hamburger.decode import base_generate_batch, generate, generate_batch
from hamburger.decode.growing_cache import GrowingCache
from hamburger.model.compat import cache_param_name

PROMPTS = [[5, 17, 33, 8, 61, 12], [9, 4], [70, 71, 72, 73, 74, 75, 76, 77]]


def test_cache_param_name_follows_the_signature():
    class New(torch.nn.Module):
        def forward(self, x, cache=None, **kwargs): ...

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, x, **kwargs): ...

    assert cache_param_name(New) == "cache"
    assert cache_param_name(Old) == "past_key_values"
    with pytest.raises(TypeError, match="Neither.forward has no KV-cache parameter"):
        cache_param_name(Neither)


def test_installed_decoders_take_a_cache_argument():
    model = tiny_hamburger()
    for module in (model.base, model.base.model, model.base.model.layers[0], model.micro.layers[0]):
        assert cache_param_name(type(module)) in ("cache", "past_key_values")


class Records:
    """A cache that records its length after every update of layer 0 (in RecordingCache.lengths)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[int] = []
        RecordingCache.lengths.append(self.log)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            self.log.append(self.get_seq_length())
        return out


class RecordingCache(Records, DynamicCache):
    lengths: list[list[int]] = []


class RecordingGrowingCache(Records, GrowingCache):
    """The batched decoders' base cache (GrowingCache)."""


@pytest.fixture
def recording(monkeypatch):
    RecordingCache.lengths = []
    monkeypatch.setattr(decode_mod, "DynamicCache", RecordingCache)
    monkeypatch.setattr(batched_mod, "DynamicCache", RecordingCache)
    monkeypatch.setattr(batched_mod, "GrowingCache", RecordingGrowingCache)
    return RecordingCache.lengths


def test_base_cache_grows_one_entry_per_macro_step(recording):
    model = sharp_model()
    res = generate(model, PROMPTS[0], max_new_tokens=20, confidence=0.5)
    base_log = recording[0]  # the first cache made is the base's
    n = len(PROMPTS[0])
    assert base_log == [n + i for i in range(len(res.seg_lens))]
    assert res.kv_entries == n + len(res.seg_lens) - 1
    # every micro cache grows F+1, then 1 per further micro step
    f = model.micro.num_features
    for log in recording[1:]:
        assert log == [f + 1 + i for i in range(len(log))]
    assert any(len(log) > 1 for log in recording[1:]), "the test needs segments of 3+ tokens"


def test_batched_caches_grow(recording):
    model = sharp_model()
    generate_batch(model, PROMPTS, max_new_tokens=12, confidence=0.0)  # every segment K tokens
    width = max(len(p) for p in PROMPTS)
    assert recording[0] == [width + i for i in range(len(recording[0]))]
    assert len(recording[0]) > 1
    f, k = model.micro.num_features, model.config.max_segment_len
    assert [log for log in recording[1:] if log] and all(
        log == [f + 1 + i for i in range(k - 1)] for log in recording[1:]
    )
    RecordingCache.lengths.clear()
    base_generate_batch(model.base, PROMPTS, max_new_tokens=6)
    assert recording[0] == [width + i for i in range(6)]


def recompute_generate(model, prompt: list[int], max_new: int, confidence: float) -> tuple[list, list]:
    """HAMburger greedy decoding with no cache at all: every step re-reads everything."""
    k = model.config.max_segment_len
    emb = model.embed_tokens
    inputs = emb(torch.tensor(prompt))
    positions = list(range(len(prompt)))
    tokens, seg_lens = [], []
    while True:
        out = model.base.model(
            inputs_embeds=inputs[None], position_ids=torch.tensor([positions]), output_hidden_states=True
        )
        feats = torch.stack([h[:, -1] for h in model.features(out.hidden_states)], dim=1)
        tok, stop = model.first_token(feats[:, -1])
        seg = [int(tok)]
        slots = model.micro.features_in(feats)
        budget = min(k, max_new - len(tokens))
        while len(seg) < budget and 1 - torch.sigmoid(stop).item() >= confidence:
            o = model.micro(torch.cat([slots, emb(torch.tensor([seg]))], dim=1))[:, -1]
            seg.append(int(model.lm_head(o).argmax(-1)))
            stop = model.stop_head(o)
        tokens += seg
        seg_lens.append(len(seg))
        if len(tokens) >= max_new:
            return tokens, seg_lens
        x = model.smash(torch.tensor([seg + [0] * (k - len(seg))]), torch.tensor([len(seg)]))
        inputs = torch.cat([inputs, x])
        positions.append(positions[-1] + len(seg))


@torch.no_grad()
@pytest.mark.parametrize("confidence", [0.0, 0.5])
def test_cached_decoding_equals_recomputation(confidence):
    model = sharp_model()
    batched = generate_batch(model, PROMPTS, 14, confidence)
    for p, b in zip(PROMPTS, batched, strict=True):
        ref = recompute_generate(model, p, 14, confidence)
        single = generate(model, p, 14, confidence)
        assert (single.tokens, single.seg_lens) == ref
        assert (b.tokens, b.seg_lens) == ref
    assert any(n > 1 for n in ref[1])


@torch.no_grad()
def test_cached_base_decoding_equals_recomputation():
    model = sharp_model()
    results = base_generate_batch(model.base, PROMPTS, 8)
    for p, r in zip(PROMPTS, results, strict=True):
        ids = list(p)
        for _ in range(8):
            ids.append(int(model.base(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert r.tokens == ids[len(p) :]
