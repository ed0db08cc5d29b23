"""The eval stage: metric definitions on hand-built traces, and the command end to end."""

from __future__ import annotations

import json
import sqlite3

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


def test_code_runner_times_out_and_isolates():
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert not passes_tests("import time\ndef f():\n    time.sleep(30)", "def check(g):\n    g()", "f", 1.0)


@pytest.mark.distributed
def test_eval_command_end_to_end(baseline, tmp_path):
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
