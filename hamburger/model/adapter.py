"""The adapter folder: a HAMburger model without its base's weights, put onto the base when loaded.

A run whose base did not train (model.base_training frozen) or trained only LoRA adapters ships
the grafted modules (embedder, micro decoder, stop head) and the LoRA pairs: about 16M
parameters for SmolLM2-135M and 270M for a 1B base, instead of the whole model. Its config.json
is an ordinary model folder's plus an `adapter` block naming the base (as the run configured
it), the base's weights' content hash, and the LoRA settings. Loading reads the base's own
safetensors, checks the hash (another base, or the same name with other weights, is refused
naming both), folds any LoRA into the weights and checks every tensor as a full folder's are:
load(), serve, eval and the registry read both kinds of folder the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

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
    return not name.startswith("base.") or ".lora_A." in name or ".lora_B." in name


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


def lora_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """The LoRA tensors an adapter folder of this config holds, by name and shape."""
    from .folder import build_model
    from .lora import LoraSettings, add_lora, lora_parameter_names

    settings = meta[ADAPTER_KEY].get("lora") or {}
    if not settings:
        return {}
    model = build_model(meta, device="meta")
    with torch.device("meta"):
        add_lora(model.base, LoraSettings(**settings))
    state = model.state_dict()
    return {k: tuple(state[k].shape) for k in lora_parameter_names(state)}


def compose_state(path: str | Path, meta: dict, base: str = "") -> dict[str, torch.Tensor]:
    """The full model state of an adapter folder: its own tensors, the base's weights (checked
    against the recorded hash) and the LoRA pairs folded in. `base` overrides the recorded name."""
    from hamburger.assets import resolve_model

    from .folder import TIED_KEY, expected_shapes, load_state, weight_files
    from .lora import merged_state

    block = meta[ADAPTER_KEY]
    name = base or block["base"]
    base_path = resolve_model(name)
    found = base_fingerprint(base_path)
    if found != block["base_sha256"]:
        raise BaseMismatch(
            f"{path}: an adapter for base {block['base']!r} (weights sha256 {block['base_sha256'][:16]}), "
            f"but {name!r} ({base_path}) has weights {found[:16]}: pass the base it was trained on"
        )
    expected, _ = expected_shapes(meta)
    own = {k: s for k, s in expected.items() if is_adapter_tensor(k)} | lora_shapes(meta)
    state = load_state(path, own)
    from safetensors import safe_open

    for key, file in weight_files(base_path).items():
        with safe_open(file, "pt") as f:
            state[f"base.{key}"] = f.get_tensor(key)
    if block.get("lora"):  # the adapted layers' weights sit at base_layer names until merged
        for key in list(state):
            stem = key.removesuffix(".weight")
            if key.startswith("base.") and f"{stem}.lora_A.default.weight" in state:
                state[f"{stem}.base_layer.weight"] = state.pop(key)
    state = {k: v.contiguous() for k, v in merged_state(state, block.get("lora")).items()}
    if TIED_KEY not in expected:
        state.pop(TIED_KEY, None)
    return state
