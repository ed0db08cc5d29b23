"""The eager batches' building blocks: GrowingCache (appends in place) gives transformers'
DynamicCache's logits through prefill, steps, row selection and crops; prefill groups bound the
padding a join computes; the nucleus found among the top tokens is the one a full sort finds."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_base
from transformers import DynamicCache

from hamburger.decode.continuous import PAD_SHARE, Sequence, prefill_groups
from hamburger.decode.growing_cache import GrowingCache, GrowingLayer
from hamburger.decode.sampling import NUCLEUS_FIRST, nucleus_probs
from hamburger.decode.steppers import left_pad


@torch.no_grad()
def test_growing_cache_gives_dynamic_cache_logits_through_steps_selection_and_crop():
    torch.manual_seed(0)
    lm = tiny_base().eval()
    prompts = [torch.randint(3, 90, (n,)).tolist() for n in (5, 9, 2)]
    ids, mask, pos = left_pad(prompts, 0, "cpu")
    caches = [DynamicCache(config=lm.config), GrowingCache(lm.config)]
    assert all(isinstance(layer, GrowingLayer) for layer in caches[1].layers)
    outs = [
        lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c).logits for c in caches
    ]
    torch.testing.assert_close(outs[0], outs[1])
    last = pos[:, -1]
    for step in range(70):  # past 64 columns: the buffer grows (doubles) on the way
        if step == 30:  # a row leaves, as a finished sequence does
            keep = torch.tensor([0, 2])
            for c in caches:
                c.batch_select_indices(keep)
            mask, last = mask[keep], last[keep]
        if step == 50:
            for c in caches:
                c.crop(-3)
            mask = mask[:, :-3]
        tok = torch.randint(3, 90, (len(last), 1))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        kw = {"input_ids": tok, "attention_mask": mask, "position_ids": last[:, None]}
        outs = [lm(**kw, past_key_values=c).logits for c in caches]
        torch.testing.assert_close(outs[0], outs[1])
    layer = caches[1].layers[0]
    assert layer.keys.shape == caches[0].layers[0].keys.shape
    assert layer.k_buf.shape[-2] >= layer.used and layer.k_buf.shape[-2] < 4 * layer.used  # doubling


def test_prefill_groups_bound_padding_and_keep_order():
    lengths = [3, 4, 4, 30, 31, 2, 60, 58, 59, 5]
    seqs = [Sequence(prompt_ids=[7] * n, max_new_tokens=1) for n in lengths]
    groups = prefill_groups(seqs)
    assert [s for g in groups for s in g] == seqs  # every prompt once, in order
    for g in groups:
        real = sum(len(s.prompt_ids) for s in g)
        assert len(g) == 1 or max(len(s.prompt_ids) for s in g) * len(g) <= PAD_SHARE * real
    assert [len(g) for g in groups] == [3, 2, 1, 3, 1]
    assert prefill_groups([]) == []


@pytest.mark.parametrize("spread", [8.0, 0.01])  # peaked: the nucleus is in the top; flat: it is not
def test_nucleus_from_the_top_tokens_is_the_full_sorts(spread):
    torch.manual_seed(1)
    logits = torch.randn(4, 5000) * spread
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    want = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(before >= 0.9, 0.0))
    got = nucleus_probs(logits, 1.0, 0.9)
    torch.testing.assert_close(got, want)
    kept = int((got > 0).sum(-1).max())
    assert (kept < NUCLEUS_FIRST) == (spread > 1)  # both paths are taken
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 1.0), probs)
