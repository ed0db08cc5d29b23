"""MLflow tracking: metrics.jsonl is the source of truth, MLflow gets it asynchronously, replay
sends exactly what a run lacks, system metrics sit beside the losses, artifacts stay beside a
local store."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from trainer.train.tracking import Tracker, artifact_location, replay


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    """Each Tracker picks its default store (OUTPUT_DIR/mlflow.db), not another test's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_replay_sends_exactly_what_the_run_lacks(tmp_path):
    t = Tracker(str(tmp_path), True, system_metrics_s=0)
    for step in range(1, 6):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    t.close()
    (tmp_path / "run_info.json").write_text(json.dumps({"run_id": t.run_id, "tracking_uri": t.uri}))
    client = mlflow.MlflowClient(t.uri)
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1, 2, 3, 4, 5]
    # Steps 6 and 7 reached metrics.jsonl while the server was down (as in an outage).
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (6, 7):
            f.write(
                json.dumps({"step": step, "time": time.time(), "metrics": {"loss": 0.1, "lr": 0.1}}) + "\n"
            )
    assert replay(str(tmp_path)) == 4  # two steps x two metrics
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1, 2, 3, 4, 5, 6, 7]
    assert replay(str(tmp_path)) == 0


def test_system_metrics_are_logged_beside_the_losses(tmp_path):
    t = Tracker(str(tmp_path), True, system_metrics_s=1)
    t.log_metrics({"loss": 1.0}, 1)
    time.sleep(3)
    t.close()
    keys = mlflow.MlflowClient(t.uri).get_run(t.run_id).data.metrics
    assert "loss" in keys and any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


def test_a_local_store_keeps_artifacts_beside_it(tmp_path):
    t = Tracker(str(tmp_path), True, system_metrics_s=0)
    (tmp_path / "note.txt").write_text("x")
    t.log_artifact(tmp_path / "note.txt")
    t.close()
    assert (tmp_path / "mlartifacts").is_dir() and list((tmp_path / "mlartifacts").rglob("note.txt"))
    assert artifact_location("http://server:5000") is None  # a server decides for itself


def test_a_full_disk_is_named_for_the_metrics_file_and_the_mlflow_store(tmp_path, monkeypatch, capsys):
    import errno

    import pytest

    from hamburger.io import DiskFullError
    from trainer.train import tracking

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    t = Tracker(str(tmp_path), False)  # writer, no MLflow
    monkeypatch.setattr(tracking, "open", full, raising=False)
    with pytest.raises(
        DiskFullError,
        match=rf"no space left on the device holding {tmp_path / 'metrics.jsonl'} while writing the run's metrics",
    ):
        t.log_metrics({"loss": 1.0}, 1)

    note = tracking._OutageNote(tmp_path / "metrics.jsonl", "sqlite:///big/mlflow.db")
    note.note("OperationalError: database or disk is full")
    assert "no space left for the MLflow store sqlite:///big/mlflow.db" in capsys.readouterr().err
