"""Resume checkpoints: complete or absent, the newest found automatically, the oldest pruned.

Layout: OUTPUT/checkpoints/step_000100/ holds DeepSpeed's per-rank files (model, optimiser,
scheduler, our client state: step, data position, RNG states, MLflow run id) and, written by
rank 0 only after every rank has finished, a COMPLETE marker. A folder without it (a job
killed mid-save) is ignored on resume and removed by the next save.

Resuming needs the same world size: ZeRO-3 optimiser partitions are per rank, and the data
plan is split per rank. A different world size is refused with a message; to change it,
export the checkpoint (consolidated) and start a new run from the export.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from hamburger.io import atomic_write_text, disk_full_named

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def is_step_folder(p: Path) -> bool:
    """A folder this trainer writes into checkpoints/ (step_000100); nothing else is ours."""
    return p.is_dir() and re.fullmatch(r"step_\d{6,}", p.name) is not None


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_step_folder(p) and (p / COMPLETE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


@dataclass
class CheckpointInfo:
    """What a checkpoint is, written by rank 0 into its COMPLETE marker once every rank's files
    are on disk. Export and resume read this record, never DeepSpeed's own files, to know which
    model, data and run a checkpoint belongs to."""

    step: int
    world_size: int
    run_id: str | None
    base: str
    """model.base as configured (a hub name, a folder or builtin:smollm2)."""
    base_path: str
    """The folder it resolved to (the tokenizer is copied from here on export)."""
    base_architecture: str
    base_config: dict
    hamburger: dict
    data: str
    """The prep folder trained on."""
    data_key_hash: str = ""
    """Its manifest's key hash: the data's identity even when the folder moves."""
    base_training: str = "full"
    """model.base_training: full, frozen or lora."""
    lora: dict = field(default_factory=dict)
    """The LoRA settings (base_training lora; empty otherwise): export merges the adapters with them."""

    def write(self, ckpt: Path) -> None:
        atomic_write_text(ckpt / COMPLETE, json.dumps(asdict(self), indent=1, default=str))

    @classmethod
    def read(cls, ckpt: Path) -> CheckpointInfo:
        """The record of a complete checkpoint; NotOurCheckpoint if the marker is not ours."""
        try:
            data = json.loads((ckpt / COMPLETE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NotOurCheckpoint(f"{ckpt}: unreadable {COMPLETE} marker ({e})") from None
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not isinstance(data, dict) or not required <= set(data):
            missing = sorted(required - set(data)) if isinstance(data, dict) else sorted(required)
            raise NotOurCheckpoint(
                f"{ckpt}: its {COMPLETE} marker holds no model description (missing {missing}); "
                "not a checkpoint of this trainer"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


class NotOurCheckpoint(ValueError):
    pass


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete checkpoints; drop incomplete leftovers older than them.
    Only step folders are touched: anything else a user put in the folder (an export, notes) stays."""
    complete = complete_checkpoints(root)
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    newest = complete[-1] if complete else None
    for p in root.iterdir():
        if not is_step_folder(p) or p in keep:
            continue
        if p in complete or (newest is not None and p.name < newest.name):
            shutil.rmtree(p, ignore_errors=True)


class Checkpointer:
    """Owns the run's checkpoints: decides when one is due, saves it (every rank its partition,
    then rank 0 the COMPLETE record once every rank's files are on disk) and prunes old ones.

    `identity` is what the record says about the run beyond the model: base (as configured),
    base_path, data and data_key_hash."""

    def __init__(self, output_dir: str, save_every: int, keep_last: int, strategy, identity: dict):
        self.root = checkpoint_root(output_dir)
        self.save_every, self.keep_last = save_every, keep_last
        self.strategy, self.identity = strategy, identity

    def due(self, step: int, total_steps: int) -> bool:
        """Between steps; the end of the run always saves."""
        return bool(self.save_every) and step % self.save_every == 0 and step < total_steps

    def save(self, step: int, client_state: dict, run_id: str | None) -> Path:
        strategy, ckpt = self.strategy, self.root / tag_for(step)
        with disk_full_named(self.root, f"checkpoint {ckpt.name}"):  # left without COMPLETE
            strategy.save_checkpoint(str(self.root), ckpt.name, client_state)
        strategy.barrier()  # every rank's files are on disk before the marker
        if strategy.is_rank0:
            with disk_full_named(self.root, f"checkpoint {ckpt.name}"):
                self._write_info(ckpt, step, run_id)
            prune(self.root, self.keep_last)
        strategy.barrier()
        return ckpt

    def _write_info(self, ckpt: Path, step: int, run_id: str | None) -> None:
        model = self.strategy.model
        CheckpointInfo(
            step=step,
            world_size=self.strategy.world_size,
            run_id=run_id,
            base_architecture=type(model.base).__name__,
            base_config=model.base.config.to_dict(),
            hamburger=model.config.to_dict(),
            **self.identity,
        ).write(ckpt)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_world_size(ckpt: Path, world_size: int) -> None:
    saved = CheckpointInfo.read(ckpt).world_size
    if saved != world_size:
        raise RuntimeError(
            f"{ckpt} was written by {saved} ranks; this job has {world_size}. Resuming on a different "
            "world size is not supported (ZeRO-3 optimiser partitions and the data plan are per rank). "
            f"Relaunch with {saved} ranks, or export it (./launch.sh export) and train from the export."
        )


def find_resume_checkpoint(resume: str, output_dir: str) -> Path | None:
    """resume=auto: the newest complete checkpoint of output_dir (None: a new run); none; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_root(output_dir))
    ckpt = Path(resume)
    if not ckpt.is_dir() or not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder")
    return ckpt


def set_aside_old_checkpoints(output_dir: str) -> None:
    """resume=none in a folder that has checkpoints: keep them (renamed), so a fresh run's
    checkpoints never mix with another run's and resume=auto never picks an old one."""
    root = checkpoint_root(output_dir)
    if root.is_dir() and any(root.iterdir()):
        aside = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        root.rename(aside)
        print(f"[train] resume=none: moved the folder's earlier checkpoints to {aside}", flush=True)
