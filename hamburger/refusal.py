"""How a distributed command ends on bad input: one message, once, no traceback.

Every rank of a job usually refuses the same input the same way (they read the same config,
sources and model folder), and eight ranks printing one message eight times, each under a
traceback, buries it. A refusal (a ValueError or FileNotFoundError whose message names the file,
row, field or key) is printed by the first rank on the node that reaches it, and by any rank
whose message differs (a rank-specific refusal is never lost); anything else is a fault, not a
refusal, and each rank prints its traceback.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

REFUSALS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def rank() -> int:
    """This process's global rank (the launcher's RANK), before or after process-group init."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def first_to_say(message: str) -> bool:
    """True for the first local rank of this job to report `message`. The ranks of a job share
    their launcher process (the parent) and master port; a marker file named by those and the
    message's hash is created by exactly one of them."""
    if "LOCAL_RANK" not in os.environ:
        return True  # not launched as ranks: one process, one message
    job = f"{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    digest = hashlib.sha256(message.encode()).hexdigest()[:16]
    marker = Path(tempfile.gettempdir()) / f"hamburger-refusal-{job}-{digest}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no writable temp folder: rather twice than never
    return True


def exit_on(command: str, e: BaseException, refusals: tuple[type[BaseException], ...] = REFUSALS) -> NoReturn:
    """Print `e` the way its kind deserves (see the module docstring), then exit 1."""
    if isinstance(e, refusals):
        message = f"[{command}] error: {e}"
        if first_to_say(message):
            print(message, file=sys.stderr, flush=True)
    else:
        print(
            f"[{command}] rank {rank()} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(1)
