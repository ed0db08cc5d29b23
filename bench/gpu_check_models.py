"""The GPU check's shared pieces: model shapes, random-weight models, segment-length draws, memory.

Every section of bench/gpu_check.py (and bench/bench_static_decode.py) builds its models from
these shapes with random weights and reads peak memory the same way, so they live apart from
the sections. Needs only torch and transformers; importing it puts the repo root on sys.path
(the GPU machine runs these files as scripts, without installing the repo).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hamburger.decode.forced import draw, geometric, tilted  # noqa: E402, F401 - re-exported to the sections
from hamburger.model import HAMburgerConfig, HAMburgerModel  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    ),
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
"""Dense bf16 peak by card name (first match), for MFU."""


def llama_config(shape: str, attn: str = "sdpa"):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPES[shape]
    )
    cfg._attn_implementation = attn
    return cfg


def random_base(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(llama_config(shape)).to(dtype).eval()


def random_hamburger(shape: str, device, dtype, **hcfg) -> HAMburgerModel:
    base = random_base(shape, device, dtype)
    model = HAMburgerModel(base, HAMburgerConfig(**hcfg))
    return model.to(device=device, dtype=dtype).eval()


def segment_distribution(manifest: str, k: int) -> list[float]:
    """P(segment length = 1..k): the labelled data's histogram, or geometric with the demo's mean."""
    if manifest:
        hist = json.loads(Path(manifest).read_text())["segment_histogram"]
        counts = [float(hist.get(str(n), 0)) for n in range(1, k + 1)]
        return [c / sum(counts) for c in counts]
    return geometric(k)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
