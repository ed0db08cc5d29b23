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
