"""Attention for packed training rows: a dense block-diagonal mask, or a FlexAttention block mask.

A packed row holds several samples that must not attend to each other. The dense form is an
additive [rows, 1, L, L] mask: simple and exact, but O(L^2) memory per row (about 1 GiB per
micro-batch at L = 8192 in bf16) and it keeps SDPA off its flash kernels. The flex form is a
FlexAttention BlockMask built from the sample ids: O(L^2 / 128^2) memory, fully masked blocks
skipped, one fused (compiled) kernel. Both allow exactly the same (query, key) pairs: causal,
same sample, and every position always sees itself (padding never yields NaN).

The base model is switched to the attention function registered here (`IMPL`): it runs
FlexAttention when given a BlockMask and transformers' own SDPA function otherwise, so
decoding and everything else keep their behaviour. FlexAttention has no backward on CPU, so
`auto` picks flex on CUDA and the dense mask elsewhere.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .batch import packed_causal_mask

PACKED_ATTENTION = ("auto", "dense", "flex")
IMPL = "hamburger_packed"


@functools.cache
def register() -> str:
    """Register IMPL with transformers once (attention function + SDPA-style mask creation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, _attention)
    AttentionMaskInterface.register(IMPL, sdpa_mask)
    return IMPL


def use_flex(mode: str, device: torch.device) -> bool:
    return mode == "flex" or (mode == "auto" and device.type == "cuda")


def packed_mask(seq_ids: torch.Tensor, dtype: torch.dtype, flex: bool):
    """The attention mask for rows of sample ids [rows, L]: a dense tensor or a BlockMask."""
    if not flex:
        return packed_causal_mask(seq_ids, dtype)
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, kv):
        return ((seq_ids[b, q] == seq_ids[b, kv]) & (kv <= q)) | (q == kv)

    rows, length = seq_ids.shape
    kw = dict(B=rows, H=None, Q_LEN=length, KV_LEN=length, device=seq_ids.device)
    if seq_ids.is_cuda and not COMPILE_FAILURES["block_mask"]:
        # Compiled, the block mask is built block by block; uncompiled it first materialises
        # rows x L x L booleans (and int64 intermediates): about 1 GiB per 8192-position row.
        try:
            return create_block_mask(allowed, **kw, _compile=True)
        except Exception as exc:  # any compile failure: fall back, and say so once
            COMPILE_FAILURES["block_mask"].append(repr(exc))
            warnings.warn(
                f"compiled block-mask creation failed, building it uncompiled: {exc!r}", stacklevel=2
            )
    return create_block_mask(allowed, **kw)


COMPILE_FAILURES: dict[str, list[str]] = {"block_mask": [], "flex_attention": []}
"""Compile errors met so far (each falls back to the uncompiled, slower form, with a warning)."""


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(query, key, value, block_mask, scale) -> torch.Tensor:
    """Compiled on CUDA (one fused kernel); uncompiled (CPU, or if compiling fails) it is a
    reference implementation that materialises the scores: correct, slower."""
    from torch.nn.attention.flex_attention import flex_attention

    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    if query.is_cuda and not COMPILE_FAILURES["flex_attention"]:
        try:
            return _compiled_flex()(query, key, value, **kw)
        except Exception as exc:  # any compile failure: fall back, and say so once
            COMPILE_FAILURES["flex_attention"].append(repr(exc))
            warnings.warn(f"compiling FlexAttention failed, running it uncompiled: {exc!r}", stacklevel=2)
    return flex_attention(query, key, value, **kw)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-function signature: returns ([B, q, H, hd], None)."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        out = _flex(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def prepare_base(base, mode: str) -> None:
    """Point the base's attention at IMPL when flex may be used (the base must use sdpa)."""
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"hamburger.packed_attention must be one of {PACKED_ATTENTION}, got {mode!r}")
    impl = base.config._attn_implementation
    if mode == "dense" or impl == IMPL:
        return
    if impl != "sdpa":
        if mode == "flex":
            raise ValueError(
                f"hamburger.packed_attention=flex needs the base on sdpa attention, not {impl!r} "
                "(model.attn_implementation)"
            )
        return
    base.config._attn_implementation = register()
