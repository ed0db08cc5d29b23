"""Test helpers that build small real artefacts on disk (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hamburger.assets import smollm2_tokenizer_dir


def tiny_model_dir(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved as a folder."""
    from conftest import tiny_llama_config

    tok_dir = smollm2_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        num_hidden_layers=layers,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def tiny_hamburger_dir(path: Path, seed: int = 0) -> Path:
    """A tiny HAMburger export folder (1-layer base, K = 2) with SmolLM2's tokenizer."""
    from hamburger.model import HAMburgerConfig, HAMburgerModel, save_model

    base_dir = tiny_model_dir(path.parent / f"{path.name}-base", seed=seed, layers=1)
    model = HAMburgerModel(
        LlamaForCausalLM.from_pretrained(str(base_dir)),
        HAMburgerConfig(embedder_head_dim=16, micro_layers=1, max_segment_len=2),
    )
    save_model(model, str(path), tokenizer=AutoTokenizer.from_pretrained(str(base_dir)))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
