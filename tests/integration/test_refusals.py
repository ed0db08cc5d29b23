"""A refusal of a 2-rank job is one message, once: no traceback, not one copy per rank."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import ROOT, env, free_port, launch

pytestmark = pytest.mark.distributed


def _launch_sh(*args: str) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent
    return subprocess.run(
        [str(ROOT / "launch.sh"), *args, "--master_port", str(free_port())],
        cwd=ROOT,
        env={**env(), "HAMBURGER_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _once(proc, fragment: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count(fragment) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_a_prep_refusal_is_said_once(setup, tmp_path):
    cfg = tmp_path / "prep.yaml"
    (tmp_path / "rows.jsonl").write_text('{"instruction": "q"}\n')  # no response field: refused by row
    cfg.write_text(
        f"model: {setup['base'] / 'model'}\nsources:\n  - path: {tmp_path / 'rows.jsonl'}\noutput_root: {tmp_path}\n"
    )
    _once(_launch_sh("prep", str(cfg), "--nprocs", "2"), "rows.jsonl: row 1")


def test_a_train_refusal_of_a_broken_base_is_said_once(setup, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(setup["base"] / "model", base)
    (base / "config.json").write_text("{not json")
    proc = launch(setup["cfg"], f"output_dir={tmp_path / 'run'}", f"model.base={base}")
    _once(proc, f"{base}/config.json: not valid JSON")
