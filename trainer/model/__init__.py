"""The HAMburger model: embedder, base LLM, micro-step decoder and stop head."""

from .batch import PackedBatch, Sample, collate, packed_causal_mask
from .config import HAMburgerConfig
from .decode import DecodeResult, generate
from .hamburger import HAMburgerModel, HAMburgerOutput

__all__ = [
    "DecodeResult",
    "HAMburgerConfig",
    "HAMburgerModel",
    "HAMburgerOutput",
    "PackedBatch",
    "Sample",
    "collate",
    "generate",
    "packed_causal_mask",
]
