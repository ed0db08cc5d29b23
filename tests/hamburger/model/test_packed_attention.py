"""FlexAttention over packed rows equals the dense block-diagonal mask.

FlexAttention has no backward on CPU: here losses and outputs are compared; gradients are
compared where a GPU is present (this file, and bench/gpu_check.py's train section).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_sample, tiny_base, tiny_hamburger

from hamburger.model import HAMburgerConfig, HAMburgerModel, collate
from hamburger.model.packed_attention import IMPL, _attention, packed_mask


def packed_batch(n: int = 6):
    rng = random.Random(7)
    shapes = [(5, 11), (2, 7), (9, 14), (1, 5), (4, 1), (6, 10)]
    samples = [random_sample(rng, 96, 4, p, r, sid=i) for i, (p, r) in enumerate(shapes[:n])]
    batch = collate(samples, 4, row_capacity=40)
    assert batch.seq_ids.shape[0] < n and (batch.seq_ids == -1).any()  # packed, with padding
    return batch


def test_block_mask_allows_the_same_pairs_as_the_dense_mask():
    seq_ids = packed_batch().seq_ids
    dense = packed_mask(seq_ids, torch.float32, flex=False)
    block = packed_mask(seq_ids, torch.float32, flex=True)
    torch.manual_seed(0)
    rows, length = seq_ids.shape
    q = torch.randn(rows, 4, length, 16)
    k, v = torch.randn(rows, 2, length, 16), torch.randn(rows, 2, length, 16)
    module = tiny_base().model.layers[0].self_attn
    with torch.no_grad():
        out_dense, _ = _attention(module, q, k, v, dense, scaling=0.25)
        out_flex, _ = _attention(module, q, k, v, block, scaling=0.25)
    torch.testing.assert_close(out_flex, out_dense, atol=1e-5, rtol=1e-5)


def test_flex_and_dense_give_the_same_losses():
    model = tiny_hamburger(packed_attention="flex")
    assert model.base.config._attn_implementation == IMPL
    batch = packed_batch()
    with torch.no_grad():
        flex = model(batch, return_logits=True)
        model.config.packed_attention = "dense"
        dense = model(batch, return_logits=True)
    torch.testing.assert_close(flex.logits, dense.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex.loss, dense.loss, atol=1e-6, rtol=1e-6)


def test_auto_is_dense_on_cpu_and_decoding_is_unchanged():
    model = tiny_hamburger()  # packed_attention: auto
    assert model.base.config._attn_implementation == IMPL
    batch = packed_batch()
    loss = model(batch).loss  # backward works: auto is dense on CPU
    loss.backward()
    ref = tiny_base()  # the same weights on plain sdpa
    ids = torch.tensor([[5, 17, 33, 8, 61, 12]])
    torch.testing.assert_close(model.base(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_flex_needs_sdpa():
    with pytest.raises(ValueError, match="packed_attention=flex needs the base on sdpa"):
        HAMburgerModel(tiny_base(attn_implementation="eager"), HAMburgerConfig(packed_attention="flex"))
    with pytest.raises(ValueError, match="packed_attention must be auto, dense or flex"):
        HAMburgerConfig(packed_attention="varlen").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_and_dense_give_the_same_gradients_on_gpu():
    model = tiny_hamburger(packed_attention="flex").cuda().train()
    batch = packed_batch().to("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for mode in ("flex", "dense"):
        model.config.packed_attention = mode
        grads[mode] = torch.autograd.grad(model(batch).loss, params, allow_unused=True)
    for gf, gd in zip(grads["flex"], grads["dense"], strict=True):
        if gd is not None:
            torch.testing.assert_close(gf, gd, atol=1e-4, rtol=1e-3)
