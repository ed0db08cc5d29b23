"""The training configuration: one typed tree, YAML + `key=value` overrides (hamburger.configio)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hamburger.configio import Choice, ConfigError, check_range
from hamburger.model.config import HAMburgerConfig
from hamburger.model.lora import LoraSettings


class BaseTraining(Choice):
    full = "full"
    frozen = "frozen"
    lora = "lora"


class Precision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class ModelConfig:
    base: str = "builtin:smollm2"
    """Base LLM: hub name (e.g. meta-llama/Llama-3.2-1B-Instruct), local folder, or builtin:smollm2."""
    hamburger: HAMburgerConfig = field(default_factory=HAMburgerConfig)
    gradient_checkpointing: bool = False
    """Recompute the base's activations in backward (less memory, ~30% more compute)."""
    attn_implementation: str = "sdpa"
    """Attention kernel for the base and micro decoder (sdpa handles the packed block mask)."""
    base_training: BaseTraining = BaseTraining.full
    """How the base trains beside the grafted modules: full (every weight, at optim.lr_base),
    frozen (no gradient and no optimiser state: only the grafted modules train) or lora (the
    base frozen, low-rank adapters on its linear layers trained at optim.lr_base, merged into
    the weights on export)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapters of base_training: lora."""


@dataclass
class DataConfig:
    path: str = ""
    """A data-prep output folder (holding manifest.json)."""
    prep_config: str = ""
    """Or a data-prep YAML: prep runs first (every rank joins; finished shards are reused)."""
    prep_overrides: list[str] = field(default_factory=list)
    """key=value overrides for prep_config."""
    tokens_per_batch: int = 4096
    """Micro-batch budget per rank, in base (macro) positions after packing."""
    row_capacity: int = 1024
    """Macro positions per packed row (samples never attend to each other within a row)."""
    eval_split: str = "eval"
    """Split of the prep folder used for held-out evaluation."""
    shuffle: bool = True
    """Seeded shuffle of the samples each epoch (same order on every rank and on resume)."""


@dataclass
class OptimConfig:
    lr_base: float = 5e-5
    """Learning rate of the base model (embeddings included), or of its LoRA adapters
    (model.base_training: lora). 0 freezes the base as model.base_training: frozen does."""
    lr_new: float = 1e-4
    """Learning rate of the grafted modules (embedder, micro decoder, stop head)."""
    min_lr: float = 1e-5
    """Floor of the cosine decay (for both groups, scaled by their ratio to lr_base; to lr_new
    when the base is frozen)."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay (both groups)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off); fills the DeepSpeed config."""
    grad_accum: int = 1
    """Micro-batches per rank per optimiser step."""


@dataclass
class MLflowConfig:
    tracking_uri: str = ""
    """Empty: $MLFLOW_TRACKING_URI, else a sqlite store inside output_dir."""
    experiment: str = "hamburger"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name (empty: MLflow picks one)."""
    enabled: bool = True
    """Log to MLflow at all (metrics.jsonl is written either way)."""


@dataclass
class PhaseConfig:
    name: str = ""
    """The phase's name: its folder (OUTPUT_DIR/phaseN-NAME) and the MLflow `phase` tag."""
    steps: int = 0
    """Optimiser steps of the phase (its max_steps; the learning-rate schedule spans them)."""
    overrides: list[str] = field(default_factory=list)
    """key=value settings of this phase over the config's own (e.g. model.base_training=frozen)."""


PHASE_OWNED = ("output_dir", "max_steps", "init_from", "phases", "resume")
"""Keys a phase's overrides may not set: the recipe sets them for every phase."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    output_dir: str = "outputs/run"
    """Run folder: config, checkpoints, metrics.jsonl, the default MLflow store."""
    ds_config: str = "auto"
    """DeepSpeed config file. auto: on GPU ds_configs/zero2_bf16.json when ZeRO-2's model states
    (2 bytes per parameter whole, 14 partitioned over the ranks) fit half of one GPU's memory,
    else ds_configs/zero3_bf16.json; on CPU ds_configs/zero3_cpu.json. The choice is printed."""
    precision: Precision = Precision.auto
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32. Overrides the DeepSpeed file's precision."""
    epochs: int = 1
    """Passes over the training split."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run the epochs)."""
    seed: int = 0
    """Seed of the data order and of the new modules' initialisation."""
    log_every: int = 1
    """Log training metrics every N steps."""
    eval_every: int = 50
    """Held-out evaluation every N steps (0: only at the end)."""
    eval_max_batches: int = 0
    """Cap on eval micro-batches per rank (0: the whole held-out split)."""
    save_every: int = 100
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; none; or a checkpoint path."""
    dist_timeout_s: int = 1800
    """Collective timeout: a rank that stops answering fails the job after this, naming itself."""
    init_from: str = ""
    """A run folder (its newest checkpoint) or checkpoint whose model weights start this run: the
    base and grafted modules (LoRA folded or carried over as this run trains), not its optimiser,
    schedule or data position. Ignored when this run resumes from its own checkpoint."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """A staged recipe: the phases run in order in one job, each a run of its own in
    OUTPUT_DIR/phaseN-NAME started from the previous phase's weights, all logged to one MLflow
    run (steps counted across phases, the phase as a tag). Empty: one ordinary run."""

    @property
    def base_training(self) -> str:
        """How the base really trains: model.base_training, with optim.lr_base 0 meaning frozen."""
        bt = str(self.model.base_training.value)
        return "frozen" if bt == "full" and self.optim.lr_base == 0 else bt

    def validate(self) -> None:
        """Every value that could make a run meaningless is refused here, naming its key."""
        self.model.hamburger.validate()
        if self.phases and self.resume not in ("auto", "none"):
            raise ConfigError(
                f"resume={self.resume} with phases: a recipe resumes each phase from its own folder (resume=auto)"
            )
        names = [p.name for p in self.phases]
        for i, p in enumerate(self.phases):
            if not p.name or not p.name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(
                    f"phases.{i}.name must be a non-empty name of letters, digits, - or _, got {p.name!r}"
                )
            if p.name in names[:i]:
                raise ConfigError(f"phases.{i}.name {p.name!r} names two phases")
            check_range(f"phases.{i}.steps", p.steps, p.steps >= 1, ">= 1")
            for item in p.overrides:
                if item.split("=", 1)[0] in PHASE_OWNED:
                    raise ConfigError(
                        f"phases.{i}.overrides: {item.split('=', 1)[0]} is set by the recipe for every phase "
                        f"({', '.join(PHASE_OWNED)})"
                    )
        if self.model.base_training == BaseTraining.lora:
            self.model.lora.validate()
            if self.optim.lr_base == 0:
                raise ConfigError(
                    "optim.lr_base is 0 with model.base_training=lora: the adapters would never train"
                )
        if not (self.data.path or self.data.prep_config):
            raise ConfigError("data: set data.path (a prep folder) or data.prep_config (a prep YAML)")
        d, o = self.data, self.optim
        check_range("data.tokens_per_batch", d.tokens_per_batch, d.tokens_per_batch >= 1, ">= 1")
        check_range("data.row_capacity", d.row_capacity, d.row_capacity >= 1, ">= 1")
        check_range(
            "data.row_capacity",
            d.row_capacity,
            d.row_capacity <= d.tokens_per_batch,
            f"<= data.tokens_per_batch ({d.tokens_per_batch})",
        )
        for name in ("lr_base", "lr_new", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(o, name)
            check_range(f"optim.{name}", value, math.isfinite(value) and value >= 0, "a finite number >= 0")
        check_range("optim.eps", o.eps, math.isfinite(o.eps) and o.eps > 0, "a finite number > 0")
        check_range("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0")
        check_range("optim.grad_accum", o.grad_accum, o.grad_accum >= 1, ">= 1")
        check_range("optim.betas", o.betas, len(o.betas) == 2, "two values")
        for i, beta in enumerate(o.betas):
            check_range(f"optim.betas.{i}", beta, 0 <= beta < 1, "in [0, 1)")
        check_range("resume", self.resume, bool(self.resume), "auto, none or a checkpoint path")
        check_range("epochs", self.epochs, self.epochs >= 1, ">= 1")
        check_range(
            "max_steps", self.max_steps, self.max_steps == -1 or self.max_steps >= 1, "-1 (off) or >= 1"
        )
        check_range("log_every", self.log_every, self.log_every >= 1, ">= 1")
        for name in ("eval_every", "save_every", "eval_max_batches"):
            check_range(name, getattr(self, name), getattr(self, name) >= 0, ">= 0 (0: off)")
        check_range("keep_last", self.keep_last, self.keep_last >= 1, ">= 1")
        check_range("dist_timeout_s", self.dist_timeout_s, self.dist_timeout_s >= 1, ">= 1")
