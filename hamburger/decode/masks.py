"""The static decoders' attention masks: explicit, additive, built from boolean `allowed`
tensors, so no transformers mask logic sits between a step and its kernels."""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, q, L] bool -> [B, 1, q, L] additive mask (0 where allowed)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)[:, None]


def prompt_mask(real: torch.Tensor) -> torch.Tensor:
    """[B, w] real-token flags -> [B, w, w] allowed: causal over each row's real tokens (a pad
    attends to itself only, so its softmax is never NaN)."""
    q = torch.arange(real.shape[1], device=real.device)
    eye = torch.eye(len(q), dtype=torch.bool, device=real.device)[None]
    return ((q[None, :] <= q[:, None])[None] & real[:, None, :]) | eye
