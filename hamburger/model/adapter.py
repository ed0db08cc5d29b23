"""The adapter folder: a HAMburger model without its base's weights, put onto the base when loaded.

A run whose base did not train (model.base_training frozen) or trained only LoRA adapters ships
the grafted modules (embedder, micro decoder, stop head) and the LoRA pairs: about 16M
parameters for SmolLM2-135M and 270M for a 1B base, instead of the whole model. Its config.json
is an ordinary model folder's plus an `adapter` block naming the base (as the run configured
it), the base's weights' content hash, and the LoRA settings. Loading reads the base's own
safetensors, checks the hash (another base, or the same name with other weights, is refused
naming both), folds any LoRA into the weights and checks every tensor as a full folder's are:
load(), serve, eval and the registry read both kinds of folder the same way (the loading is
folder.compose_state; this module holds what export and loading share).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .lora import is_lora_name

ADAPTER_KEY = "adapter"


class BaseMismatch(ValueError):
    """The base found for an adapter folder is not the one it was trained on."""


def base_fingerprint(folder: str | Path) -> str:
    """sha256 over the base folder's safetensors files (names and bytes, in name order): the
    identity of its weights, whatever the folder or hub name is called."""
    from hamburger.io import sha256_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def is_adapter_tensor(name: str) -> bool:
    """What an adapter folder stores: everything but the base's own weights (LoRA pairs kept)."""
    return not name.startswith("base.") or is_lora_name(name)


def adapter_block(base: str, base_path: str, base_training: str, lora: dict) -> dict:
    """The config.json block an adapter export writes."""
    if base_training not in ("frozen", "lora"):
        raise ValueError(
            f"an adapter folder needs a run whose base did not train (model.base_training frozen or "
            f"lora); this one trained its whole base ({base_training}): export the full folder instead"
        )
    return {
        "base": base,
        "base_sha256": base_fingerprint(base_path),
        "base_training": base_training,
        "lora": lora,
    }
