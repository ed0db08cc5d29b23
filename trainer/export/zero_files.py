"""DeepSpeed's ZeRO checkpoint files, read without an engine: which files a checkpoint holds,
that each is safe to unpickle, and their consolidation into one full state (for export).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

LATEST = "latest"  # DeepSpeed writes the newest tag's name here, last
STAGE12_MODEL = "mp_rank_00_model_states.pt"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
"""Files beside the rank files that anything might unpickle: a checkpoint holding one is refused."""


class ZeroFileError(RuntimeError):
    """A DeepSpeed checkpoint file is missing, truncated or unsafe; the message names it."""


def is_stage_1_or_2(ckpt: Path) -> bool:
    """ZeRO stage 1/2 write one full model file; stage 3 one model partition per rank."""
    return (ckpt / STAGE12_MODEL).is_file() and not any(ckpt.glob("*zero_pp_rank_*_model_states.pt"))


def verify_zero_files(ckpt: Path, world_size: int) -> None:
    """For export: a ZeRO checkpoint (stage 1, 2 or 3, any world size) whose files are all
    present and safe (see verify_loadable)."""
    if not (ckpt.parent / LATEST).is_file():
        raise ZeroFileError(
            f"{ckpt.parent}: missing DeepSpeed's `{LATEST}` file; the checkpoint folder is incomplete"
        )
    verify_loadable(ckpt, world_size)


def verify_loadable(ckpt: Path, world_size: int) -> None:
    """Every file DeepSpeed will read (to consolidate, or to resume) is present and passes the
    restricted unpickler, and no other file it might unpickle lies beside them: DeepSpeed itself
    loads with the ordinary unpickler, so a file that is not checked first is never left there."""
    expected = rank_files(ckpt, world_size)
    unexpected = sorted(
        p.name for p in ckpt.iterdir() if p.is_file() and p not in expected and p.suffix in PICKLE_SUFFIXES
    )
    if unexpected:
        raise ZeroFileError(
            f"{ckpt}: {unexpected[0]} is not a file of this {world_size}-rank checkpoint (it holds "
            f"{', '.join(p.name for p in expected)}); DeepSpeed would unpickle it, so the checkpoint is "
            "refused: remove the file if you know where it came from"
        )
    for f in expected:
        check_safe_to_unpickle(f)


def has_rank_files(ckpt: Path) -> bool:
    return any(ckpt.glob("*_model_states.pt"))


def rank_files(ckpt: Path, world_size: int) -> list[Path]:
    """DeepSpeed's model and optimiser files of one checkpoint (per rank; stage 1/2 keep one
    model file); a missing one is named."""
    stage12 = is_stage_1_or_2(ckpt)
    kinds = ("optim_states",) if stage12 else ("model_states", "optim_states")
    files = [ckpt / STAGE12_MODEL] if stage12 else []
    for r in range(world_size):
        for kind in kinds:
            names = [f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt", f"bf16_zero_pp_rank_{r}_mp_rank_00_{kind}.pt"]
            found = [ckpt / n for n in names if (ckpt / n).is_file()]
            if not found:
                raise ZeroFileError(f"{ckpt}: missing rank file {names[0]} (written by {world_size} ranks)")
            files.append(found[0])
    return files


def _safe_globals() -> list:
    """The only non-tensor classes a DeepSpeed ZeRO checkpoint of this trainer pickles: numpy
    arrays (RNG state), DeepSpeed's stage enum, loss scalers and (stage 1/2) fragment
    addresses. Nothing here runs code: each is data rebuilt from its fields."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    dtypes = [getattr(np.dtypes, n) for n in np.dtypes.__all__]
    return [
        core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *dtypes,
        ZeroStageEnum,
        fragment_address,  # stage 1/2 optimiser files: a (numel, start) dataclass per fragment
        LossScaler,
        DynamicLossScaler,
    ]


def check_safe_to_unpickle(path: Path) -> None:
    """Refuse a rank file that is truncated or whose unpickling would build anything beyond
    tensors and the allow-listed classes. DeepSpeed's consolidation loads these files with the
    unrestricted unpickler; reading each one first with torch's restricted unpickler means a
    crafted checkpoint is refused before any of its code could run."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, OSError...
        text = str(e)
        found = re.search(
            r"(unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|but got [^\n]*)", text, re.I
        )
        detail = found.group(1) if found else (text.strip().splitlines() or [""])[0][:200]
        raise ZeroFileError(
            f"{path}: refused: not a readable checkpoint file of this trainer ({type(e).__name__}: {detail}). "
            "Rank files are read with torch's restricted unpickler; a file that needs anything else "
            "(truncated, or crafted to run code) is never loaded."
        ) from None


def consolidated_zero_state(ckpt: Path) -> dict:
    """Lazy fp32 tensors (materialised on .contiguous()) of the whole model, by name, from the
    rank partitions of any world size. Call verify_zero_files first: DeepSpeed unpickles freely."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    except Exception as e:  # noqa: BLE001 - torch.load / DeepSpeed raise many kinds on bad files
        raise ZeroFileError(f"{ckpt}: cannot consolidate the checkpoint ({type(e).__name__}: {e})") from None
