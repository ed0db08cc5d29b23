"""The one rule for `dtype: auto` everywhere (labelling, training precision, evaluation, serving):
bf16 on a GPU, fp32 on a CPU (CPU bf16 matmuls are slow and lose precision for nothing)."""

from __future__ import annotations

import torch

from hamburger.choice import Choice


class DType(Choice):
    """A config's `dtype` field: auto, float32 or bfloat16."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; otherwise the named dtype (float32/fp32, bfloat16/bf16)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in NAMES:
        raise ValueError(f"dtype {name!r}: expected auto, {', '.join(NAMES)}")
    return NAMES[name]
