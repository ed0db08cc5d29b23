"""The HAMburger model folder: what export writes, what serving and eval load.

    config.json                 {"model_type": "hamburger", "base_architecture", "base_config", "hamburger"}
    model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files, generation_config.json, README.md (model card)

Every load checks the tensors against the config: a missing, empty or mis-shaped tensor is
an error that names it. The tied LM head (when the base ties it) is not stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import ADAPTER_KEY, BaseMismatch, base_fingerprint, is_adapter_tensor
from .config import HAMburgerConfig
from .folder_check import check_model_folder
from .hamburger import HAMburgerModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "hamburger"
TIED_KEY = "base.lm_head.weight"


def _register_with_transformers() -> None:
    """Let transformers' Auto classes recognise `model_type: hamburger`. AutoTokenizer reads an
    export's config.json and, for a type it does not know, warns "You are using a model of type
    `hamburger` to instantiate a model of type ``... can yield errors" on every load, which reads
    like a fault and is not one. The registered class only names the type; the model itself is
    built by build_model from the config's base_config."""
    from transformers import AutoConfig, PretrainedConfig

    class HAMburgerFolderConfig(PretrainedConfig):
        model_type = MODEL_TYPE

    try:
        AutoConfig.register(MODEL_TYPE, HAMburgerFolderConfig)
    except ValueError:  # already registered (the module was imported under another name)
        pass


_register_with_transformers()


class WeightsError(ValueError):
    """Weights do not match the config; the message names the tensor."""


def save_model(
    model: HAMburgerModel, path: str | Path, tokenizer=None, max_shard_size: int | str = "2GB"
) -> None:
    """A self-contained folder: config, safetensors (the frozen teacher left out), tokenizer."""
    os.makedirs(path, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    if model.base_ties_embeddings():
        state.pop(TIED_KEY, None)  # safetensors refuses shared storage
    save_weights(
        path, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, state.__getitem__, max_shard_size
    )
    write_meta(path, type(model.base).__name__, model.base.config.to_dict(), model.config.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, base: str = "") -> HAMburgerModel:
    """Load a folder written by save_model or export; needs no network. Every tensor is
    checked against the config first (a missing or mis-shaped one is named). An adapter folder
    (hamburger/model/adapter.py) is put onto its base: the recorded one, or `base`."""
    meta = read_meta(path)
    expected, _ = expected_shapes(meta)
    if meta.get(ADAPTER_KEY):
        state = compose_state(path, meta, base)
        check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, f"{path} on its base")
    else:
        state = load_state(path, expected)
    model = build_model(meta, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == TIED_KEY and model.base_ties_embeddings())]
    if missing or unexpected:  # check_shapes already refused these; kept as a guard
        raise WeightsError(f"{path}: missing {missing}, unexpected {unexpected}")
    model.config.kl_weight = meta["hamburger"].get("kl_weight", 0.0)
    return model.to(dtype).eval()


def read_meta(path: str | Path) -> dict:
    """An export's config.json, once the folder is checked whole (folder_check names the file)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a HAMburger model folder")
    meta = check_model_folder(path, tokenizer=False)
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{cfg_file}: model_type is {meta.get('model_type')!r}, expected {MODEL_TYPE!r}")
    return meta


def base_config_from_meta(meta: dict):
    from transformers import AutoConfig

    cfg = dict(meta["base_config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build_model(meta: dict, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """An HAMburgerModel shaped by meta (weights uninitialised on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        base = AutoModelForCausalLM.from_config(base_config_from_meta(meta), dtype=dtype)
        hcfg = HAMburgerConfig.from_dict(
            {**meta["hamburger"], "kl_weight": 0.0, "align_weight": 0.0}
        )  # losses of training only
        return HAMburgerModel(base, hcfg)


def expected_shapes(meta: dict) -> tuple[dict[str, tuple[int, ...]], bool]:
    """{tensor name: shape} a folder must hold, and whether the LM head is tied (not stored)."""
    model = build_model(meta, device="meta")
    tied = model.base_ties_embeddings()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    if tied:
        shapes.pop(TIED_KEY, None)
    return shapes, tied


def check_shapes(expected: dict[str, tuple], actual: dict[str, tuple], where: str) -> None:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if tuple(actual[k]) != tuple(expected[k]))
    empty = sorted(k for k in set(expected) & set(actual) if 0 in tuple(actual[k]) and 0 not in expected[k])
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:10]}")
    if empty:
        problems.append(f"empty tensors {empty[:10]} (a ZeRO-3 partition saved without a gather?)")
    if wrong:
        problems.append("wrong shapes " + ", ".join(f"{k}: {actual[k]} != {expected[k]}" for k in wrong[:10]))
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:10]}")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems))


def weight_files(path: str | Path) -> dict[str, str]:
    """{tensor name: file} from the index, or every tensor of the single file."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        return {k: str(path / f) for k, f in index["weight_map"].items()}
    single = path / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    with safe_open(str(single), "pt") as f:
        return {k: str(single) for k in f.keys()}


def load_state(path: str | Path, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """All tensors, checked against `expected` before anything is returned."""
    files = weight_files(path)
    state, shapes = {}, {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
                    state[k] = f.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on a bad file
            raise WeightsError(f"{file}: unreadable safetensors file ({e})") from None
    for k, file in files.items():
        if k not in shapes:
            raise WeightsError(f"{path}: tensor {k} is listed in the index but missing from {file}")
    check_shapes(expected, shapes, str(path))
    return state


def save_weights(
    path: str | Path,
    names_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    get: Callable[[str], torch.Tensor],
    max_shard_size: int | str = "2GB",
) -> list[str]:
    """Write tensors shard by shard, fetching each with get(name): only one shard is in memory."""
    from huggingface_hub import split_torch_state_dict_into_shards

    empty = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in names_shapes.items()}
    pattern = WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(empty, filename_pattern=pattern, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        shard = {k: get(k).detach().to("cpu").contiguous() for k in names}
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        Path(path, INDEX_NAME).write_text(json.dumps(index, indent=1))
    return list(split.filename_to_tensors)


def write_meta(
    path: str | Path,
    base_architecture: str,
    base_config: dict,
    hamburger: dict,
    lineage: dict | None = None,
    adapter: dict | None = None,
) -> None:
    """lineage (exports only): base model name, source run id, checkpoint step, data folder;
    adapter (adapter exports only): the base it goes onto (hamburger/model/adapter.py)."""
    meta = {
        "model_type": MODEL_TYPE,
        "base_architecture": base_architecture,
        "base_config": base_config,
        "hamburger": hamburger,
        "lineage": lineage or {},
    }
    if adapter:
        meta["adapter"] = adapter
    Path(path, CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))


# ---------------------------------------------------------------- adapter folders (adapter.py)
def lora_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """The LoRA tensors an adapter folder of this config holds, by name and shape."""
    from .lora import LoraSettings, add_lora, is_lora_name

    settings = meta[ADAPTER_KEY].get("lora") or {}
    if not settings:
        return {}
    model = build_model(meta, device="meta")
    with torch.device("meta"):
        add_lora(model.base, LoraSettings(**settings))
    state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if is_lora_name(k)}


def compose_state(path: str | Path, meta: dict, base: str = "") -> dict[str, torch.Tensor]:
    """The full model state of an adapter folder: its own tensors, the base's weights (checked
    against the recorded hash) and the LoRA pairs folded in. `base` overrides the recorded name."""
    from safetensors import safe_open

    from hamburger.assets import resolve_model

    from .lora import lora_key, merged_state

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
    for key, file in weight_files(base_path).items():
        with safe_open(file, "pt") as f:
            state[f"base.{key}"] = f.get_tensor(key)
    if block.get("lora"):  # the adapted layers' weights sit at base_layer names until merged
        for key in list(state):
            stem = key.removesuffix(".weight")
            if key.startswith("base.") and lora_key(stem, "A") in state:
                state[f"{stem}.base_layer.weight"] = state.pop(key)
    state = {k: v.contiguous() for k, v in merged_state(state, block.get("lora")).items()}
    if TIED_KEY not in expected:
        state.pop(TIED_KEY, None)
    return state
