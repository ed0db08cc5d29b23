"""LoRA on the base's linear layers (through peft), and merging it back for an export.

With `model.base_training: lora` the base's own weights stay frozen (no gradient, no optimiser
state); peft puts a low-rank pair A [r, in], B [out, r] beside each targeted linear layer, so the
layer computes W x + (alpha / r) B A x (alpha / sqrt(r) with rsLoRA). B starts at zero: step 0 is
the base exactly. The grafted modules train as always.

peft is used with `inject_adapter_in_model`, which changes the targeted layers in place and
leaves the base's module tree (model.layers, lm_head) as HAMburger reads it. A state dict then
names `...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight` and
`...q_proj.lora_B.default.weight`; `merged_state` folds those back into `...q_proj.weight`, so an
export is an ordinary HAMburger folder that load, serve and eval read unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

ADAPTER = "default"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    rank: int = 16
    """LoRA rank r of every adapted layer."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) B A (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input while training."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names of the base's linear layers that get an adapter (matched as peft matches them: the
    last component of the module name)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"model.lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one linear layer")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)


def add_lora(base: nn.Module, settings: LoraSettings) -> list[nn.Parameter]:
    """Put adapters on `base` in place, freeze everything else of it; returns the LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    settings.validate()
    found = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(settings.target_modules) - found)
    if missing:
        raise ValueError(
            f"model.lora.target_modules {missing}: no linear layer of {type(base).__name__} has that name "
            f"(its linear layers: {sorted(found)})"
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        use_rslora=settings.rslora,
        bias="none",
    )
    tied = getattr(base.config, "tie_word_embeddings", False)
    shared = [t for t in settings.target_modules if t in ("lm_head", "embed_tokens")]
    if tied and shared:
        raise ValueError(
            f"model.lora.target_modules {shared}: this base ties its LM head to its embeddings, and an "
            "adapter on one would not reach the other (exports store the shared weight once)"
        )
    inject_adapter_in_model(config, base, adapter_name=ADAPTER)
    lora = []
    for name, p in base.named_parameters():
        p.requires_grad_(is_lora_name(name))
        if is_lora_name(name):
            lora.append(p)
    return lora


def is_lora_name(name: str) -> bool:
    """Whether a parameter or state-dict name is one of peft's LoRA pairs (A or B)."""
    return ".lora_A." in name or ".lora_B." in name


def lora_key(stem: str, which: str) -> str:
    """The state-dict name of an adapted layer's LoRA matrix `which` (A or B)."""
    return f"{stem}.lora_{which}.{ADAPTER}.weight"


def adapter_shape(settings: dict) -> dict:
    """What makes two LoRA settings give the same adapters (shapes and scale; dropout aside):
    a resume must match it, a phase carries adapters over only when it matches."""
    return {
        "rank": settings.get("rank"),
        "alpha": settings.get("alpha"),
        "rslora": settings.get("rslora"),
        "target_modules": sorted(settings.get("target_modules") or []),
    }


class _Merged:
    """W + scaling * B @ A, computed when the export asks for the tensor (as the lazy ZeRO
    tensors are), so a merge holds one layer's matrices at a time."""

    def __init__(self, weight, lora_a, lora_b, scaling: float):
        self.parts = (weight, lora_a, lora_b)
        self.scaling = scaling
        self.shape = weight.shape

    def contiguous(self) -> torch.Tensor:
        w, a, b = (t.contiguous() for t in self.parts)
        dtype = torch.promote_types(w.dtype, torch.float32)  # fp32 at least, as the export writes
        w, a, b = w.to(dtype), a.to(dtype), b.to(dtype)
        return (w + self.scaling * (b @ a)).contiguous()


def merged_state(state: dict, settings: dict | None) -> dict:
    """A state dict with every adapted layer folded back into its plain weight name. `settings`
    is the LoraSettings dict a checkpoint recorded (None or empty: no LoRA, state unchanged)."""
    if not settings:
        return state
    scaling = LoraSettings(**settings).scaling
    out = {}
    for name, tensor in state.items():
        if is_lora_name(name):
            continue
        if name.endswith(".base_layer.weight"):
            stem = name[: -len(".base_layer.weight")]
            a, b = state[lora_key(stem, "A")], state[lora_key(stem, "B")]
            out[f"{stem}.weight"] = _Merged(tensor, a, b, scaling)
        elif ".base_layer." in name:  # a bias of an adapted layer
            out[name.replace(".base_layer.", ".")] = tensor
        else:
            out[name] = tensor
    return out


def carried_state(names: list[str], state: dict, settings: dict | None, where: str = "checkpoint") -> dict:
    """`state` (a checkpoint's, LoRA `settings` or none) as the starting weights of a model whose
    parameters are `names` (LoRA or not): a name the checkpoint has is taken as is (adapters
    carried over); an adapted layer's base weight is the checkpoint's (merged) plain weight; new
    adapters keep their fresh initialisation (B = 0: the start is the checkpoint's model); the
    frozen teacher is the base as loaded. Anything else missing is named."""
    plain = merged_state(state, settings)
    out, missing = {}, []
    for name in names:
        fresh_adapter = is_lora_name(name) and name not in state
        if name.startswith("teacher.") or fresh_adapter:
            continue
        if name in state:
            out[name] = state[name]
        elif ".base_layer." in name and name.replace(".base_layer.", ".") in plain:
            out[name] = plain[name.replace(".base_layer.", ".")]
        elif name in plain:
            out[name] = plain[name]
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"{where} has no weights for {missing[:10]}: not a run of this model's shape")
    return out
