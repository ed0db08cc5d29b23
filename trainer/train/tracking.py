"""MLflow tracking from rank 0, which never stops training.

One run per job (its id is handed to every rank and saved in checkpoints, so a resumed job
logs into the same run). Parameters are flattened, truncated and chunked. Every metric record
is first appended to `metrics.jsonl` in the output folder: that file is the source of truth.
MLflow's own asynchronous logging delivers it, so a slow or dead tracking server never blocks
a training step. When the run closes, whatever steps MLflow lacks (the server was down) are
counted and named; `./launch.sh replay OUTPUT_DIR [TRACKING_URI]` (in the project's environment) sends exactly
those later. System metrics (CPU/GPU utilisation and memory) are logged beside the losses.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from hamburger.io import disk_full_named

MAX_PARAM_LEN = 500  # MLflow's limit is 6000; long values are truncated with a marker
PARAMS_PER_CALL = 90  # log_batch takes at most 100 params
METRICS_PER_CALL = 900  # and at most 1000 metrics
ASYNC_LOGGER = "mlflow.utils.async_logging.async_logging_queue"


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
        system_metrics_s: float = 10.0,
    ):
        self.output_dir = Path(output_dir)
        self.writer = writer
        self.enabled = enabled and writer
        self.run_id = run_id
        self.local = self.output_dir / "metrics.jsonl"
        self.uri = ""
        self.continues = ""
        self._monitor = None
        if not self.enabled:
            return
        _fail_fast_env()
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = default_tracking_uri(output_dir, tracking_uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if run_id is not None and not self._has_run(run_id):
            # resume=PATH of another output_dir whose run lives in another store: a new run here,
            # tagged with the one it continues (its metrics so far stay in that store)
            print(
                f"[train] MLflow run {run_id} (of the checkpoint) is not in {self.uri}: logging to a new "
                "run there, tagged continues_run_id",
                flush=True,
            )
            self.continues = run_id
            run_id = None
        if run_id is None:
            exp_id = experiment_id(self.client, experiment, self.uri)
            self.run_id = self.client.create_run(exp_id, run_name=run_name or None).info.run_id
            if self.continues:
                self.client.set_tag(self.run_id, "continues_run_id", self.continues)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self._outage = _OutageNote(self.local, self.uri)
        logging.getLogger(ASYNC_LOGGER).addFilter(self._outage)
        if system_metrics_s > 0:
            self._monitor = _start_system_metrics(self.run_id, self.uri, system_metrics_s)

    def _has_run(self, run_id: str) -> bool:
        """Whether this store holds the run; any other MLflow failure (a down server) is raised."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    # ---------------------------------------------------------------- params and artifacts (start-up)
    def log_run_start(
        self, params: dict[str, str], tags: dict[str, str], artifacts: list[Path], folder: str | None = None
    ) -> None:
        """What the run is, logged once when it starts: params (a resumed run keeps the ones it
        has), tags, and the files that define it (config, DeepSpeed config, data manifest), in
        `folder` of the run's artifacts (a recipe phase's own) or at their root."""
        self.log_params(params)
        self.set_tags(tags)
        for path in artifacts:
            self.log_artifact(path, folder)

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
                print(f"[tracking] warning: could not log artifact {path}: {e}", file=sys.stderr, flush=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    # ---------------------------------------------------------------- metrics (never blocks training)
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), "metrics": {k: float(v) for k, v in metrics.items()}}
        if self.writer:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with disk_full_named(self.local, "the run's metrics"), open(self.local, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.enabled:
            try:
                self.client.log_batch(self.run_id, metrics=_to_mlflow([record]), synchronous=False)
            except Exception as e:  # noqa: BLE001 - queueing itself failed: the file still has it
                self._outage.note(f"{type(e).__name__}: {e}")

    def close(self, status: str = "FINISHED") -> None:
        """Wait for MLflow's queue, end the run, and say what (if anything) MLflow lacks."""
        if not self.enabled:
            return
        import mlflow

        if self._monitor is not None:
            self._monitor.finish()
        try:
            mlflow.flush_async_logging()
            self.client.set_terminated(self.run_id, status=status)
            lacking = len(missing_records(self.client, self.run_id, self.local))
        except Exception as e:  # noqa: BLE001 - the server is gone; the file keeps everything
            lacking, why = -1, f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            logging.getLogger(ASYNC_LOGGER).removeFilter(self._outage)
        if lacking:
            what = "an unknown number of" if lacking < 0 else str(lacking)
            print(
                f"[tracking] MLflow lacks {what} metric records of this run"
                + (f" (it is unreachable: {why})" if lacking < 0 else "")
                + f"; every record is in {self.local}. When the server is back: "
                f"./launch.sh replay {self.output_dir}",
                file=sys.stderr,
                flush=True,
            )


class _OutageNote(logging.Filter):
    """MLflow's async queue logs one error per failed batch; say it once, in our words."""

    def __init__(self, local: Path, uri: str = ""):
        super().__init__()
        self.local, self.uri = local, uri
        self.noted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.note(record.getMessage()[:200])
            return False
        return True

    def note(self, why: str) -> None:
        if not self.noted:
            self.noted = True
            store = self.uri or "the tracking store"
            problem = (
                f"no space left for the MLflow store {store}"
                if any(w in why.lower() for w in ("disk is full", "no space left", "disk quota"))
                else "MLflow unreachable"
            )
            print(
                f"[tracking] warning: {problem} ({why}); training goes on, every metric is kept "
                f"in {self.local} and the gap is reported at the end",
                file=sys.stderr,
                flush=True,
            )


def _fail_fast_env() -> None:
    """Fail fast against a dead server instead of MLflow's default minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _start_system_metrics(run_id: str, uri: str, every_s: float):
    """CPU/GPU utilisation and memory every `every_s` seconds in the run (GPU ones where pynvml sees a GPU)."""
    try:
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mlflow.set_system_metrics_sampling_interval(every_s)  # the constructor's argument loses to it
        mlflow.set_system_metrics_samples_before_logging(1)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=uri
        )
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - optional: never stops training
        print(f"[tracking] warning: no system metrics ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


def _to_mlflow(records: list[dict]) -> list:
    from mlflow.entities import Metric

    return [Metric(k, v, int(r["time"] * 1000), r["step"]) for r in records for k, v in r["metrics"].items()]


def read_records(local: Path) -> list[dict]:
    """metrics.jsonl's records; a step logged again after a resume keeps its last values."""
    last: dict[tuple[int, str], dict] = {}
    if local.is_file():
        for line in local.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                for k, v in rec["metrics"].items():
                    last[(rec["step"], k)] = {"step": rec["step"], "time": rec["time"], "metrics": {k: v}}
    return list(last.values())


def missing_records(client, run_id: str, local: Path) -> list[dict]:
    """The (step, metric) records of metrics.jsonl that the MLflow run does not have."""
    records = read_records(local)
    have = {
        (m.step, key)
        for key in {k for r in records for k in r["metrics"]}
        for m in client.get_metric_history(run_id, key)
    }
    return [r for r in records if (r["step"], next(iter(r["metrics"]))) not in have]


def replay(output_dir: str, tracking_uri: str = "") -> int:
    """Send the run every metric record it lacks from metrics.jsonl; returns how many were sent."""
    _fail_fast_env()
    from mlflow.tracking import MlflowClient

    info = json.loads((Path(output_dir) / "run_info.json").read_text())
    client = MlflowClient(tracking_uri or info["tracking_uri"])
    missing = missing_records(client, info["run_id"], Path(output_dir) / "metrics.jsonl")
    metrics = _to_mlflow(missing)
    for i in range(0, len(metrics), METRICS_PER_CALL):
        client.log_batch(info["run_id"], metrics=metrics[i : i + METRICS_PER_CALL])
    return len(missing)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "replay":
        print(f"delivered {replay(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else '')} records")
    else:
        raise SystemExit("usage: ./launch.sh replay OUTPUT_DIR [TRACKING_URI]")
