"""Shared launcher helpers and the session's one trained tiny model (2 ranks, ZeRO-3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_model_dir, write_jsonl

from data_prep.config import LabelConfig, PrepConfig, SourceConfig
from data_prep.run import prepare

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # mlflow finds uvicorn
    # mlflow.set_tracking_uri() in this test process exports MLFLOW_TRACKING_URI; launched jobs
    # must not inherit another test's store.
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {
        **inherited,
        "PATH": path,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONWARNINGS": "ignore",
    }


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("train")
    model = tiny_model_dir(base / "model")
    rows = [
        {
            "instruction": f"Count from {i} to {i + 5}.",
            "output": " ".join(str(j) for j in range(i, i + 6 + i % 5)),
        }
        for i in range(48)
    ]
    data = write_jsonl(base / "count.jsonl", rows)
    prep = PrepConfig(
        model=str(model),
        sources=[SourceConfig(path=str(data))],
        output_root=str(base / "prep"),
        heldout_fraction=0.15,
        shard_rows=16,
        max_len=256,
        label=LabelConfig(strategy="fixed", fixed_k=3),
    )
    folder = prepare(prep)
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition every tensor
    (base / "ds.json").write_text(json.dumps(ds))
    cfg = (
        base / "train.yaml"
    )  # loss_chunk_tokens 16: the chunked loss runs under ZeRO-3 in every launched run
    cfg.write_text(
        f"model:\n  base: {model}\n  hamburger:\n    micro_layers: 1\n    embedder_head_dim: 16\n    loss_chunk_tokens: 16\n"
        f"data:\n  path: {folder}\n  tokens_per_batch: 160\n  row_capacity: 160\n"
        f"optim:\n  warmup_steps: 1\n  lr_base: 3e-3\n  lr_new: 3e-3\n  min_lr: 1e-3\n"
        f"ds_config: {base / 'ds.json'}\nepochs: 3\nmax_steps: 8\neval_every: 4\nsave_every: 2\nkeep_last: 2\ndist_timeout_s: 240\n"
    )
    return {"base": base, "cfg": cfg, "data": folder}


def launch(cfg: Path, *overrides: str, nprocs: int = 2, launcher: list[str] | None = None, wait: bool = True):
    cmd = [
        DEEPSPEED,
        *(launcher or ["--num_accelerators", str(nprocs), "--master_port", str(free_port())]),
        "--module",
        "trainer.train",
        str(cfg),
        *overrides,
    ]
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def losses(out_dir: Path) -> dict[int, float]:
    """Per-step training loss; the last record of a step wins (a resumed run re-logs nothing twice)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec["metrics"]:
            out[rec["step"]] = rec["metrics"]["loss"]
    return out


@pytest.fixture(scope="session")
def baseline(setup) -> Path:
    out = setup["base"] / "run_a"
    proc = launch(setup["cfg"], f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out
