"""A TERM to `./launch.sh train|prep|serve` (what `kill`, `timeout`, systemd, SLURM's first signal
and a closed terminal send) stops every process the command started within a few seconds, and a
training run stopped that way resumes to the same losses as one never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import write_jsonl
from launcher import ROOT, env, free_port, launch, losses

pytestmark = pytest.mark.distributed

VENV = Path(sys.executable).parent.parent  # the environment these tests run in, for launch.sh


def _launch_sh(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(ROOT / "launch.sh"), *args],
        cwd=ROOT,
        env={**env(), "HAMBURGER_VENV": str(VENV)},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a failing test can still clean up everything it started
    )


def _processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line holds `text` (each rank carries the job's args)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            pids.append(int(d.name))
    return pids


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited early (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _terminate_and_check_nothing_outlives(
    proc: subprocess.Popen, tag: str, log: Path, expect_rc: tuple[int, ...] = (143,)
) -> None:
    """TERM to launch.sh itself (not its group): within a few seconds it and every process naming
    the job's unique `tag` are gone, and the exit status says it was stopped (143 = 128 + TERM)."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
        end = time.monotonic() + 15
        while _processes_naming(tag) and time.monotonic() < end:
            time.sleep(0.2)
        left = _processes_naming(tag)
        assert not left, f"still running after TERM: {left}\n{log.read_text()[-3000:]}"
        assert rc in expect_rc, f"rc {rc}\n{log.read_text()[-3000:]}"
    finally:
        for pid in _processes_naming(tag):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_term_to_launch_train_stops_every_rank_and_the_run_resumes_to_the_same_losses(setup, baseline):
    out = setup["base"] / "run_termed"
    log = setup["base"] / "run_termed.log"
    proc = _launch_sh(
        "train", str(setup["cfg"]), f"output_dir={out}", "--master_port", str(free_port()), log=log
    )
    saved = out / "checkpoints" / "step_000002" / "COMPLETE"
    _wait_for(saved.exists, proc, log)
    _terminate_and_check_nothing_outlives(proc, str(out), log)
    assert "stopping the job" in log.read_text()
    assert not (out / "final_metrics.json").exists()  # it stopped before the end
    resumed = launch(setup["cfg"], f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    a, b = losses(baseline), losses(out)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):  # bit-exact on CPU, as after a SIGKILL
        assert b[step] == a[step], (step, a, b)


def test_term_to_launch_prep_stops_both_ranks(setup, tmp_path):
    rows = [{"instruction": f"Spell {i} out.", "output": " ".join(["word"] * 40)} for i in range(6000)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    out = tmp_path / "prep_termed"
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        f"model: {setup['base'] / 'model'}\nsources:\n  - path: {data}\noutput_root: {out}\n"
        "label:\n  strategy: decreasing_v2\n"
    )
    log = tmp_path / "prep.log"
    proc = _launch_sh("prep", str(cfg), "--nprocs", "2", "--master_port", str(free_port()), log=log)
    _wait_for(lambda: len(_processes_naming(str(cfg))) >= 4, proc, log)  # runner, launcher, 2 ranks
    time.sleep(3)  # the ranks are reading and labelling
    _terminate_and_check_nothing_outlives(proc, str(cfg), log)
    assert not list(out.glob("*/manifest.json"))  # no prep folder claims to be complete


def test_term_to_launch_serve_stops_the_server(setup, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _launch_sh("serve", str(setup["base"] / "model"), "--port", str(port), "--max-batch", "2", log=log)

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok
        except requests.RequestException:
            return False

    _wait_for(healthy, proc, log, timeout=120)
    # the server is the launched process itself (exec): uvicorn shuts down gracefully, then
    # re-raises the TERM (-15: ended by it, as a shell reports 143)
    _terminate_and_check_nothing_outlives(proc, f"--port {port}", log, expect_rc=(0, 143, -15))
    assert not healthy()
