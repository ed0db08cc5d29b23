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
