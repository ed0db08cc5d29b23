"""The HAMburger model: embedder, base LLM, micro-step decoder and stop head.

Decoding lives beside it, in `hamburger.decode`."""

from .batch import PackedBatch, Sample, collate, packed_causal_mask
from .config import HAMburgerConfig
from .folder import load_model, save_model
from .hamburger import HAMburgerModel, HAMburgerOutput

__all__ = [
    "HAMburgerConfig",
    "HAMburgerModel",
    "HAMburgerOutput",
    "PackedBatch",
    "Sample",
    "collate",
    "load_model",
    "save_model",
    "packed_causal_mask",
]
