"""A local model folder checked before anything loads it: an incomplete or inconsistent folder
is refused naming the folder and the file at fault, the same way from every loader (load(),
serve, eval, prep and train's model.base), instead of a KeyError, a JSON traceback or a
safetensors header error from deep inside transformers.

Hub names (`meta-llama/Llama-3.2-1B-Instruct`) are not local folders and pass untouched:
transformers reports those itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from .config import HAMburgerConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any one of these lets AutoTokenizer build a tokenizer (fast, sentencepiece, BPE or WordPiece)."""


class ModelFolderError(ValueError):
    """A model folder is incomplete or inconsistent; the message names the folder and the file."""


def check_model_folder(path: str | Path, tokenizer: bool = True) -> dict | None:
    """The folder's config.json as a dict once config, weights and (optionally) tokenizer files
    are all there and readable; None for a name that is not a local folder (a hub id)."""
    p = Path(path)
    if not p.is_dir():
        return None
    cfg = read_config(p)
    if cfg.get("model_type") == "hamburger":
        check_hamburger_block(p / "config.json", cfg)
    check_weights(p)
    if tokenizer:
        check_tokenizer(p)
    return cfg


def check_tokenizer(p: Path) -> None:
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{p}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); the folder is incomplete: "
            "copy the tokenizer the model was trained with into it"
        )


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json), or an error
    naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def read_config(p: Path) -> dict:
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelFolderError(f"{p}: no config.json: not a model folder (or an incomplete copy of one)")
    cfg = read_json_object(cfg_file)
    if not isinstance(cfg.get("model_type"), str):
        raise ModelFolderError(f"{cfg_file}: no model_type: not a transformers model config")
    return cfg


def check_hamburger_block(cfg_file: Path, cfg: dict) -> None:
    """What an export's config.json must hold beyond model_type: the base's config and
    architecture, and a `hamburger` block whose every value has its field's type."""
    base = cfg.get("base_config")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise ModelFolderError(f"{cfg_file}: `base_config` missing or not an object with a model_type")
    if not isinstance(cfg.get("base_architecture"), str):
        raise ModelFolderError(f"{cfg_file}: `base_architecture` missing or not a string")
    block = cfg.get("hamburger")
    if not isinstance(block, dict):
        raise ModelFolderError(
            f"{cfg_file}: the `hamburger` block is missing or not an object (got {type(block).__name__})"
        )
    defaults = HAMburgerConfig()
    for f in fields(HAMburgerConfig):
        if f.name in block and not _same_kind(block[f.name], getattr(defaults, f.name)):
            raise ModelFolderError(
                f"{cfg_file}: hamburger.{f.name} is {block[f.name]!r}, expected "
                f"{_kind_name(getattr(defaults, f.name))}"
            )
    try:
        HAMburgerConfig.from_dict(block).validate()
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{cfg_file}: {e}") from None


def _same_kind(value, default) -> bool:
    if isinstance(default, str):  # str-valued choices (packed_attention, micro_init)
        return isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return True


def _kind_name(default) -> str:
    for kind, name in ((str, "a string"), (bool, "true or false"), (int, "an integer"), (float, "a number")):
        if isinstance(default, kind):
            return name
    return "a list of integers"


def check_weights(p: Path) -> None:
    """The weight files the folder names exist and each safetensors file's header and length
    agree (a truncated copy is named here, not as 'invalid header length' from a loader)."""
    from safetensors import SafetensorError, safe_open

    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise ModelFolderError(f"{index}: names {missing[0]}, which is not in {p}")
    elif (p / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(p.glob("*.bin")) or any(p.glob("*.pth")):
        return  # an older HF folder of pickled weights: transformers reads those with weights_only
    else:
        raise ModelFolderError(f"{p}: no model.safetensors or model.safetensors.index.json: no weights")
    for name in files:
        try:
            with safe_open(str(p / name), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(
                f"{p / name}: not a readable safetensors file, truncated or damaged ({e})"
            ) from None
