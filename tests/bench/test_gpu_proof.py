"""The GPU proof run's dry run: bench/gpu_proof.sh at tiny shapes on CPU, the same stages as on a
GPU (prep with self-distillation, the staged recipe, the adapter export, eval), with mlflow and
datasets made unimportable as they are on the GPU machine. So the one-call proof run cannot rot
between the (rare) sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed  # starts data_prep, trainer.train, export and eval as processes
@pytest.mark.slow
def test_gpu_proof_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "bench/gpu_proof.sh", "--tiny", "--work", str(tmp_path / "work"), "--steps", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_proof.json").read_text())
    assert result["errors"] == [] and set(result["seconds"]) == {"prep", "train", "export", "eval", "total"}
    assert result["manifest"]["rows_out"] > 0 and len(result["goals"]) == 2
    report = json.loads((out / "eval.json").read_text())
    runs = {(r["decoder"], r["batch_size"], r.get("confidence")) for r in report["runs"]}
    assert runs == {
        (d, b, c) for b in (1, 2) for d, c in (("base", None), ("hamburger", 0.5), ("hamburger", 0.9))
    }
    model = out / "model"  # the trained adapter folder, in files that come back from the GPU machine
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model / "model.safetensors.index.json").is_file()
    assert all(f.stat().st_size <= 16 * 2**20 for f in model.iterdir())
    assert json.loads((model / "config.json").read_text())["adapter"]["base_sha256"]
    assert (out / "phase1-align-metrics.jsonl").is_file() and (out / "phase2-joint-metrics.jsonl").is_file()
    assert "tiny dry run" in (out / "gpu_proof.md").read_text()


def test_proof_carry_folders_are_ignored():
    """What bench/gpu_proof_assets.sh fills travels beside the tree and is never committed."""
    for path in ("bench/proof_part1/x.part1", "bench/proof_part2/x.part2", ".proof_stage/x.part1"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_the_full_proof_run_configs_load(tmp_path):
    """The GPU run's own commands (not run here): every stage's config loads and validates, so
    the one GPU call cannot fail on a typo."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_proof import commands, parse_args

    from data_prep.config import PrepConfig
    from hamburger.configio import load_config
    from trainer.evaluate.config import EvalConfig
    from trainer.train.config import TrainConfig

    cmds = commands(parse_args(["--work", str(tmp_path)]), tmp_path, tmp_path / "prep" / "abc")
    prep = load_config(PrepConfig, ROOT / cmds["prep"][3], cmds["prep"][4:])
    assert prep.generate.decode == "auto" and prep.model == "builtin:smollm2"
    train = load_config(TrainConfig, ROOT / cmds["train"][3], cmds["train"][4:])
    assert [p.steps for p in train.phases] == [100, 200] and not train.mlflow.enabled
    assert train.data.path.endswith("abc") and not train.data.prep_config
    ev = load_config(EvalConfig, None, [f"model={cmds['eval'][3]}", *cmds["eval"][4:]])
    assert ev.batch_sizes == [1, 8, 32] and ev.decode == "graphed" and len(ev.confidences) == 6
    assert cmds["export"][-1] == "15MB" and "--adapter" in cmds["export"]
