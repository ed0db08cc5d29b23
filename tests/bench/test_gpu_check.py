"""The GPU check's dry run: bench/gpu_check.sh at tiny shapes on CPU, the same code as on a GPU.

So the one-call GPU check cannot rot between the (rare) runs on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--tiny", "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"checks", "decode tiny", "label tiny", "train tiny", "serve tiny"}
    serve = sections["serve tiny"]
    assert serve["errors"] == []
    forced = "forced tau 2.0"
    cases = (("hamburger", 0.3, False), ("hamburger", 0.9, False), ("base", None, False))
    cases += (("hamburger", forced, False), ("hamburger", forced, True))
    assert {
        (r["server"], r["decode"], r["concurrency"], r["confidence"], r["batch_aware"]) for r in serve["rows"]
    } == {(k, d, c, conf, aware) for d in ("static", "eager") for c in (1, 3) for k, conf, aware in cases}
    for r in serve["rows"]:
        if r["confidence"] == forced:  # the drawn lengths (mean 2), not the stop head's; a cut shortens
            assert 1.0 <= r["tokens_per_macro_step"] <= 2.6 and (
                r["batch_aware"] or r["tokens_per_macro_step"] > 1.2
            )
    assert all(r["tokens_per_s"] > 0 and r["requests"] == 2 * r["concurrency"] for r in serve["rows"])
    assert all(r["tokens_per_macro_step"] == 1 for r in serve["rows"] if r["server"] == "base")
    assert sections["checks"]["ok"] is True
    decode = sections["decode tiny"]["rows"]
    cases = ("equal", "drawn", "drawn_k2", "drawn_aware")
    every = {(b, c, t) for b in (1, 3) for c in cases for t in (1.5, 2.0, 2.5)}
    assert {(r["batch"], r["case"], r["tau"]) for r in decode} == every - {
        (1, c, t) for c in ("drawn_k2", "drawn_aware") for t in (1.5, 2.0, 2.5)
    }
    for r in decode:
        assert r["tokens_per_s"] > 0 and r["base_tokens_per_s"] > 0 and r["bound"] > 0
        assert min(r["t_base"], r["t_micro"], r["t_embed"]) > 0
        if r["case"] == "drawn_aware":  # the batch-aware loop: no more micro calls than without it
            plain = next(x for x in decode if (x["batch"], x["case"], x["tau"]) == (3, "drawn", r["tau"]))
            assert r["micro_cutoff"] > 0 and r["m"] <= plain["m"]
        if r["case"] == "drawn_k2":
            assert r["tau_measured"] <= 2.0 and r["m"] <= 1.0
        if r["case"] == "equal" and r["batch"] == 1 and r["tau"] == 2.0:
            assert r["m"] == 1.0 and r["tau_measured"] == 2.0  # at batch 1, m = tau - 1
    label = sections["label tiny"]
    assert label["label_tokens_per_s"] > 0 and label["plain_forward_tokens_per_s"] > 0
    train = sections["train tiny"]["rows"]
    assert {(r["K"], r["attention"]) for r in train} == {(4, "dense"), (1, "dense")}
    assert all(r["tokens_per_s"] > 0 and r["model_tflops_per_step"] > 0 for r in train)
    assert all(r["steps"] == 2 and r["batches"] == 2 and r["step_s_p50"] <= r["step_s_max"] for r in train)
    profiles = sections["train tiny"]["profiles"]  # one profiled step per row: what took the time
    assert set(profiles) == {"K=4 dense", "K=1 dense"}
    assert all(p["wall_s"] > 0 and p["top"] and p["top"][0]["self_ms"] > 0 for p in profiles.values())
    md = (out / "gpu_check.md").read_text()
    assert "## decode tiny" in md and "| K | attention |" in md and "- profile K=4 dense: step" in md


def test_wheels_folder_is_ignored_and_small():
    """bench/wheels/ travels to the GPU machine beside the tree: never committed, at most 60 MiB."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0
    wheels = ROOT / "bench" / "wheels"
    if wheels.is_dir():  # filled by bench/gpu_wheels.sh
        assert sum(f.stat().st_size for f in wheels.iterdir()) <= 60 * 2**20
