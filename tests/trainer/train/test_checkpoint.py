"""Checkpoint pruning: the newest complete checkpoints stay, killed saves go, a save in progress stays."""

from __future__ import annotations

from trainer.train.checkpoint import COMPLETE, complete_checkpoints, prune


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step, complete in [(2, True), (4, True), (5, False), (6, True), (8, True), (9, False)]:
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        if complete:
            (d / COMPLETE).write_text("{}")
    prune(tmp_path, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    # an incomplete older one (a killed save) goes; a newer one (a save in progress) stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006", "step_000008", "step_000009"]


def test_pruning_touches_only_step_folders(tmp_path):
    """A user's export or notes inside checkpoints/ outlive every save's pruning."""
    for step in (2, 4, 6):
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        (d / COMPLETE).write_text("{}")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "step_best").mkdir()  # not a step tag this trainer writes
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "latest").write_text("step_000006")
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best",
        "latest",
        "notes.txt",
        "step_000006",
        "step_best",
    ]
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == b"weights"


def test_a_checkpoint_save_on_a_full_disk_names_the_folder(tmp_path, monkeypatch):
    """DeepSpeed's torch.save says only "file write failed": the error says no space, and where."""
    import shutil
    from types import SimpleNamespace

    import pytest

    from hamburger.io import DiskFullError
    from trainer.train.checkpoint import Checkpointer

    class FullDisk:
        is_rank0, world_size = True, 1

        def save_checkpoint(self, root, tag, client_state):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file"
            )

        def barrier(self):
            pass

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    ckpt = Checkpointer(str(tmp_path), save_every=2, keep_last=2, strategy=FullDisk(), identity={})
    with pytest.raises(
        DiskFullError,
        match=rf"no space left on the device holding {tmp_path / 'checkpoints'} while writing checkpoint step_000002",
    ):
        ckpt.save(2, {}, None)
