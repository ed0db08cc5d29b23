"""The eval stage: metric definitions on hand-built traces, the sandbox that runs model-written
code, and the command end to end."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from hamburger.decode import DecodeResult
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.evaluate import evaluate
from trainer.evaluate.prompts import Prompt
from trainer.evaluate.quality import cut_at_eos, extract_code, passes_tests, quality
from trainer.evaluate.speed import speed
from trainer.export.export import export


def test_speed_metrics_on_a_hand_built_trace():
    prompts = [Prompt([1, 2, 3], {}), Prompt([4, 5], {})]
    # prompt 1: segments 3,1,2 -> 6 tokens, 3 base forwards (prefill + 2), KV 3 + 2
    # prompt 2: segments 4,4 -> 8 tokens, 2 base forwards, KV 2 + 1
    results = [
        DecodeResult(tokens=[9] * 6, seg_lens=[3, 1, 2], macro_steps=3, kv_entries=5),
        DecodeResult(tokens=[9] * 8, seg_lens=[4, 4], macro_steps=2, kv_entries=3),
    ]
    m = speed(results, 2.0, prompts)
    assert m["tokens_per_macro_step"] == pytest.approx(14 / 5)
    assert m["kv_entries_per_token"] == pytest.approx((2 + 1) / 14)
    assert m["tokens_per_s"] == pytest.approx(7.0)


def test_quality_metrics_on_a_hand_built_trace():
    test = "def check(f):\n    assert f(2) == 4\n"
    prompts = [
        Prompt([1], {"test": test, "entry_point": "double"}),
        Prompt([1], {"test": test, "entry_point": "double"}),
        Prompt([1], {"answer": "Paris"}),
    ]
    texts = [
        "```python\ndef double(x):\n    return 2 * x\n```",
        "def double(x):\n    return x + 3\n",
        "The capital is  paris.",
    ]
    q = quality(prompts, texts, [[1, 2, 3], [1, 2], [5]], [[1, 2, 3], [1, 9, 9, 9], [6, 6]], timeout_s=10)
    assert q["pass_at_1"] == pytest.approx(0.5)
    assert q["exact_match"] == pytest.approx(1.0)
    assert q["agreement_exact"] == pytest.approx(1 / 3)
    assert q["agreement_prefix"] == pytest.approx((1 + 1 / 4 + 0) / 3)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6], {2}) == [5, 6]


def test_code_runner_times_out_and_isolates(tmp_path, monkeypatch):
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    # It runs the code: a right solution passes, a wrong one fails.
    check = "def check(g):\n    assert g(1) == 2"
    assert passes_tests("def f(x):\n    return x + 1", check, "f", 5.0)
    assert not passes_tests("def f(x):\n    return x + 2", check, "f", 5.0)
    # A short sleep is no failure; a long one fails by the timeout, within a bounded wall time.
    assert passes_tests("import time\ndef f():\n    time.sleep(0.1)", "def check(g):\n    g()", "f", 5.0)
    start = time.monotonic()
    assert not passes_tests("import time\ndef f():\n    time.sleep(30)", "def check(g):\n    g()", "f", 1.0)
    assert 1.0 <= time.monotonic() - start < 10.0  # it waited out the 1 s timeout, not the 30 s sleep

    # Isolated as documented: a fresh -I interpreter in a throw-away folder that is its working and
    # home directory, with an empty environment (none of this process's variables).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HAMBURGER_TEST_SECRET", "leaked")
    seen = tmp_path / "seen.json"
    code = (
        "import json, os, pathlib, sys\n"
        "pathlib.Path('written_by_model.txt').write_text('x')\n"
        "def f():\n"
        f"    pathlib.Path({str(seen)!r}).write_text(json.dumps(dict(cwd=os.getcwd(),"
        " home=os.environ.get('HOME'), env=sorted(os.environ), isolated=sys.flags.isolated)))\n"
        "    return pathlib.Path('written_by_model.txt').read_text()\n"
    )
    assert passes_tests(code, "def check(g):\n    assert g() == 'x'", "f", 5.0)
    assert not (tmp_path / "written_by_model.txt").exists()  # written into its own folder, not ours
    report = json.loads(seen.read_text())
    assert os.path.realpath(report["cwd"]) == os.path.realpath(report["home"]) != os.path.realpath(tmp_path)
    assert not os.path.exists(report["cwd"])  # the throw-away folder is gone, with what it wrote
    assert "HAMBURGER_TEST_SECRET" not in report["env"] and report["isolated"] == 1


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.is_file() and "\nState:\tZ" not in status.read_text()


def test_model_written_code_runs_in_a_throwaway_folder_and_dies_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, pathlib\n"
        "pathlib.Path('written_by_model.txt').write_text('x')\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "def f():\n    import time; time.sleep(60)\n"
    )
    assert not passes_tests(code, "def check(g):\n    g()", "f", 2.0)
    assert not (tmp_path / "written_by_model.txt").exists()  # it wrote into its own temporary folder
    pid = int(pid_file.read_text())
    deadline = time.time() + 10  # SIGKILL is delivered asynchronously
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "a process started by model-written code outlived the timeout"
    assert passes_tests("def f():\n    return 1", "def check(g):\n    assert g() == 1", "f", 5.0)


@pytest.mark.distributed
def test_eval_command_end_to_end(baseline, tmp_path, capsys):
    folder = export(str(baseline), str(tmp_path / "model"))["path"]
    cfg = EvalConfig(
        model=folder,
        max_prompts=4,
        max_new_tokens=8,
        confidences=[0.5, 0.9],
        batch_sizes=[2],
        output_dir=str(tmp_path / "eval"),
    )
    cfg.validate()
    report = evaluate(cfg)
    progress = capsys.readouterr().err  # a bar per model, confidence and batch size: never silent
    for run in ("[eval] base, batch 2", "[eval] hamburger c=0.5, batch 2", "[eval] hamburger c=0.9, batch 2"):
        assert run in progress, progress[-2000:]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["mlflow_run_id"] == report["mlflow_run_id"]
    runs = saved["runs"]
    assert [r["decoder"] for r in runs] == ["base", "hamburger", "hamburger"]
    assert runs[0]["tokens_per_macro_step"] == 1.0 and "speedup" in runs[1]
    assert all(r["generated_tokens"] == saved["prompts"] * 8 for r in runs)  # fixed-length speed regime
    assert set(saved["definitions"]) >= {"regime", "tokens_per_macro_step", "kv_entries_per_token", "speedup"}
    assert saved["heldout_ce"]["tokens"] > 0
    png = tmp_path / "eval" / "speed_quality.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    db = sqlite3.connect(tmp_path / "eval" / "mlflow.db")
    keys = {k for (k,) in db.execute("select key from metrics")}
    assert "ham_c0.5/bs2/tokens_per_macro_step" in keys and "base/bs2/tokens_per_s" in keys
