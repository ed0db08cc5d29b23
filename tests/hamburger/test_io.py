"""A write that fails for want of space is named as such, with the path, wherever a stage writes."""

from __future__ import annotations

import errno
import shutil
from types import SimpleNamespace

import pytest

from hamburger.io import DiskFullError, disk_full_named, is_disk_full


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("sqlite3.OperationalError: database or disk is full"),
    ],
)
def test_disk_full_errors_are_recognised_and_named_with_the_path(tmp_path, error):
    assert is_disk_full(error)
    with pytest.raises(
        DiskFullError, match=rf"no space left on the device holding {tmp_path} while writing the export"
    ):
        with disk_full_named(tmp_path, "the export"):
            raise error


def test_a_vague_write_error_on_a_full_device_is_named_too(tmp_path, monkeypatch):
    """torch.save says only "file write failed"; the device's free space tells why."""
    vague = RuntimeError(
        "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0"
    )
    assert not is_disk_full(vague, tmp_path)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=4096)
    )
    assert is_disk_full(vague, tmp_path / "not" / "yet")


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with disk_full_named(tmp_path, "x"):
            raise KeyError("k")
