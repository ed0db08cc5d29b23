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
import shutil
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def mark_complete(ckpt: Path, info: dict) -> None:
    tmp = ckpt / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(ckpt / COMPLETE)


def read_info(ckpt: Path) -> dict:
    return json.loads((ckpt / COMPLETE).read_text())


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete checkpoints; drop incomplete leftovers older than them."""
    complete = complete_checkpoints(root)
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    newest = complete[-1] if complete else None
    for p in root.iterdir():
        if not p.is_dir() or p in keep:
            continue
        if p in complete or (newest is not None and p.name < newest.name):
            shutil.rmtree(p, ignore_errors=True)


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
    saved = read_info(ckpt).get("world_size")
    if saved is not None and saved != world_size:
        raise RuntimeError(
            f"{ckpt} was written by {saved} ranks; this job has {world_size}. Resuming on a different "
            "world size is not supported (ZeRO-3 optimiser partitions and the data plan are per rank). "
            f"Relaunch with {saved} ranks, or export it (./launch.sh export) and train from the export."
        )
