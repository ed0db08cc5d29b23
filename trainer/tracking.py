"""MLflow tracking from rank 0, which never stops training.

One run per job (its id is handed to every rank and saved in checkpoints, so a resumed job
logs into the same run). Parameters are flattened, truncated and chunked. Metrics go through
a background thread: if the tracking server goes away, training goes on with a warning, the
metrics wait in memory and in `mlflow_pending.jsonl`, and reach MLflow when it comes back
(or later, with `python -m trainer.tracking replay OUTPUT_DIR`). Every metric is also
written to `metrics.jsonl` in the output folder.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

MAX_PARAM_LEN = 500  # MLflow's limit is 6000; long values are truncated with a marker
PARAMS_PER_CALL = 90  # log_batch takes at most 100 params


def default_tracking_uri(output_dir: str, configured: str = "") -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its runs' artifacts. For a local database store: beside the
    database (MLflow's default is `./mlruns` of whatever folder the job happened to start in, so
    a run's artifacts would leave its output folder). A tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, creating it (with its artifacts beside a local store) if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def flatten_params(prefix: str, data: dict) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(key: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{key}.{k}" if key else str(k), v)
        else:
            text = json.dumps(node) if isinstance(node, list | tuple) else str(node)
            out[key[:250]] = (
                text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 14] + "...[truncated]"
            )

    walk(prefix, data)
    return out


class Tracker:
    """Rank 0 talks to MLflow; other ranks hold a no-op tracker."""

    def __init__(
        self,
        output_dir: str,
        enabled: bool,
        tracking_uri: str = "",
        experiment: str = "hamburger",
        run_name: str = "",
        run_id: str | None = None,
        writer: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.writer = writer
        self.enabled = enabled and writer
        self.run_id = run_id
        self.local = self.output_dir / "metrics.jsonl"
        self.pending_file = self.output_dir / "mlflow_pending.jsonl"
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[dict] = []
        self._warned = False
        self.uri = ""
        if not self.enabled:
            return
        # Fail fast against a dead server instead of MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = default_tracking_uri(output_dir, tracking_uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if run_id is None:
            exp_id = experiment_id(self.client, experiment, self.uri)
            self.run_id = self.client.create_run(exp_id, run_name=run_name or None).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        if self.pending_file.is_file():  # left over from an earlier attempt of this job
            self._pending = [json.loads(line) for line in self.pending_file.read_text().splitlines() if line]
        self._thread = threading.Thread(target=self._worker, daemon=True, name="mlflow-logger")
        self._thread.start()

    # ---------------------------------------------------------------- params and artifacts (start-up)
    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), PARAMS_PER_CALL):
            chunk = [Param(k, v) for k, v in items[i : i + PARAMS_PER_CALL]]
            self.client.log_batch(self.run_id, params=chunk)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            try:
                self.client.log_artifact(self.run_id, str(path), folder)
            except Exception as e:  # noqa: BLE001 - an artifact must never stop training
                self._warn(f"could not log artifact {path}: {e}")

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    # ---------------------------------------------------------------- metrics (never blocks training)
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), "metrics": {k: float(v) for k, v in metrics.items()}}
        if self.writer:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with open(self.local, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.enabled:
            self._queue.put(record)

    def _worker(self) -> None:
        while True:
            try:
                record = self._queue.get(timeout=5.0)
            except queue.Empty:
                record = None
            if record is not None and record != "stop":
                self._pending.append(record)
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001 - the logger thread must outlive any MLflow error
                self._warn(
                    f"MLflow logging error ({type(e).__name__}: {e}); metrics kept in {self.pending_file}"
                )
                self._save_pending()
            if record == "stop":
                return

    def _flush(self) -> None:
        from mlflow.entities import Metric

        while self._pending:
            batch = self._pending[:50]
            metrics = [
                Metric(k, v, int(r["time"] * 1000), r["step"]) for r in batch for k, v in r["metrics"].items()
            ]
            try:
                for i in range(0, len(metrics), 900):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 900])
            except Exception as e:  # noqa: BLE001 - the server may be gone; keep the metrics
                self._warn(f"MLflow unreachable ({type(e).__name__}); metrics kept in {self.pending_file}")
                self._save_pending()
                return
            del self._pending[: len(batch)]
            if self._warned:
                print(
                    "[tracking] MLflow reachable again; pending metrics delivered",
                    file=sys.stderr,
                    flush=True,
                )
                self._warned = False
        self._save_pending()

    def _save_pending(self) -> None:
        if self._pending:
            self.pending_file.write_text("".join(json.dumps(r) + "\n" for r in self._pending))
        elif self.pending_file.exists():
            self.pending_file.unlink()

    def _warn(self, msg: str) -> None:
        if not self._warned:
            print(f"[tracking] warning: {msg}; training goes on", file=sys.stderr, flush=True)
            self._warned = True

    def close(self, status: str = "FINISHED", wait_s: float = 30.0) -> None:
        """Deliver what is queued (waiting at most wait_s) and end the run. Whatever could not
        be delivered, queued or pending, ends up in mlflow_pending.jsonl."""
        if not self.enabled:
            return
        self._queue.put("stop")
        self._thread.join(timeout=wait_s)
        # Whatever the worker did not take (stuck on a slow server, or died) is kept too.
        left = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                self._pending.append(item)
                left = True
        if left or self._thread.is_alive():
            self._save_pending()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            self._warn(f"could not close the run: {e}")
        if self._pending:
            print(
                f"[tracking] {len(self._pending)} metric records not delivered; they are in "
                f"{self.pending_file} (replay: python -m trainer.tracking replay {self.output_dir})",
                file=sys.stderr,
                flush=True,
            )


def replay(output_dir: str, tracking_uri: str = "") -> int:
    """Send metrics left in mlflow_pending.jsonl to the run recorded in run_info.json."""
    info = json.loads((Path(output_dir) / "run_info.json").read_text())
    t = Tracker(output_dir, True, tracking_uri or info["tracking_uri"], run_id=info["run_id"])
    n = len(t._pending)
    t.close(status="FINISHED")
    return n - len(t._pending)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "replay":
        print(f"delivered {replay(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else '')} records")
    else:
        raise SystemExit("usage: python -m trainer.tracking replay OUTPUT_DIR [TRACKING_URI]")
