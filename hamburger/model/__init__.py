"""The HAMburger model: embedder, base LLM, micro-step decoder and stop head."""

from .batch import PackedBatch, Sample, collate, packed_causal_mask
from .batched_decode import base_generate_batch, generate_batch
from .config import HAMburgerConfig
from .decode import DecodeResult, generate
from .folder import load_model, save_model
from .hamburger import HAMburgerModel, HAMburgerOutput

__all__ = [
    "base_generate_batch",
    "generate_batch",
    "DecodeResult",
    "HAMburgerConfig",
    "HAMburgerModel",
    "HAMburgerOutput",
    "PackedBatch",
    "Sample",
    "collate",
    "generate",
    "load_model",
    "save_model",
    "packed_causal_mask",
]
