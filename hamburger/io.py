"""Files written whole or not at all, and content hashes: one implementation for every stage."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`: a reader (or a job killed
    mid-write) sees the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskFullError(OSError):
    """No space left where a stage writes; the message names the path and what was written."""


_NO_SPACE = ("no space left", "disk is full", "disk quota exceeded", "database or disk is full")


def is_disk_full(e: BaseException, path: Path | None = None) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain, its words in a message (sqlite, torch),
    or, for an error that says neither (torch.save's "file write failed"), almost no space left
    on the device holding `path`."""
    import errno
    import shutil

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen).lower() for words in _NO_SPACE):
            return True
        seen = seen.__cause__ or seen.__context__
    if path is None:
        return False
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < (16 << 20)
    except OSError:
        return False


class disk_full_named:
    """`with disk_full_named(path, "the export"):` turns a write that failed for want of space
    into DiskFullError("no space left on the device holding PATH while writing ..."); any other
    error passes through unchanged."""

    def __init__(self, path: Path | str, what: str):
        self.path, self.what = Path(path), what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or isinstance(e, DiskFullError) or not isinstance(e, Exception):
            return False
        if is_disk_full(e, self.path):
            raise DiskFullError(
                f"no space left on the device holding {self.path} while writing {self.what}; "
                f"free space there or write elsewhere ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        return False
