"""A staged recipe: phases run in order in one job, each started from the previous one's weights.

    phases:
      - {name: align, steps: 40, overrides: [model.base_training=frozen, model.hamburger.align_weight=1.0]}
      - {name: joint, steps: 60, overrides: [model.base_training=lora, model.hamburger.kl_weight=0.5]}

Each phase is an ordinary run in OUTPUT_DIR/phaseN-NAME (its own checkpoints, metrics.jsonl,
schedule and optimiser), with `init_from` the previous phase's folder, so the seams are the
trainer's own: rerunning the recipe finds finished phases finished and resumes the phase that
was interrupted. All phases log to one MLflow run, steps counted across phases, with the phase
as a tag and each phase's overrides as params.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hamburger.configio import with_overrides
from hamburger.model.lora import adapter_shape, carried_state, merged_state
from trainer.export.zero_files import consolidated_zero_state, verify_loadable
from trainer.train.checkpoint import CheckpointInfo
from trainer.train.config import TrainConfig
from trainer.train.tracking import default_tracking_uri


@dataclass
class Phase:
    """Where a phase sits in its recipe (None for an ordinary run)."""

    name: str
    index: int
    step_offset: int  # steps of the phases before it: MLflow steps run on across phases
    run_id: str | None  # the recipe's MLflow run, once the first phase opened it


def phase_folder(cfg: TrainConfig, index: int) -> Path:
    return Path(cfg.output_dir) / f"phase{index + 1}-{cfg.phases[index].name}"


def phase_config(cfg: TrainConfig, index: int) -> TrainConfig:
    """The run config of phase `index`: the recipe's config, the phase's overrides, then what the
    recipe owns (folder, steps, the previous phase's weights, one MLflow store)."""
    phase = cfg.phases[index]
    resume = "none" if cfg.resume == "none" else "auto"  # each phase from its own folder
    extra = [
        f"output_dir={phase_folder(cfg, index)}",
        f"max_steps={phase.steps}",
        "phases=[]",
        f"resume={resume}",
    ]
    if index:
        extra.append(f"init_from={phase_folder(cfg, index - 1)}")
    if cfg.mlflow.enabled and not cfg.mlflow.tracking_uri:
        extra.append(f"mlflow.tracking_uri={default_tracking_uri(cfg.output_dir, '')}")
    return with_overrides(cfg, [*phase.overrides, *extra], where=f" (phases.{index}: {phase.name})")


def initial_state(init_from: str, base: str, names: list[str], lora: dict | None = None) -> dict:
    """The weights `init_from` (a run folder or a checkpoint) gives a model whose parameters are
    `names` and whose LoRA settings are `lora` (None: no adapters): lazy tensors by name. The
    checkpoint's adapters are carried over when this run's have the same shape and scale, else
    folded into the weights, this run's adapters starting fresh (hamburger/model/lora.py)."""
    from trainer.export.export import ExportError, resolve_checkpoint

    try:  # the checkpoint export would take, verified the same way
        ckpt = resolve_checkpoint(init_from)
    except ExportError as e:
        raise ValueError(f"init_from={init_from}: {e}") from None
    info = CheckpointInfo.read(ckpt)
    if info.base != base:
        raise ValueError(
            f"init_from={init_from}: its base is {info.base!r}, this run's model.base is {base!r}"
        )
    verify_loadable(ckpt, info.world_size)  # the restricted unpickler before DeepSpeed reads it
    state = {k: v for k, v in consolidated_zero_state(ckpt).items() if not k.startswith("teacher.")}
    if info.lora and adapter_shape(info.lora) != adapter_shape(lora or {}):
        state, settings = merged_state(state, info.lora), None  # fold them in; new adapters start at B = 0
    else:
        settings = info.lora
    return carried_state(names, state, settings, where=f"init_from={ckpt}")
