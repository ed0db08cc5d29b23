"""Learning curves from metrics.jsonl: the end slope, resumed runs, runs without held-out
records, the PNG itself, and a real tiny training run leaving them behind."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.train.curves import (
    END_FRACTION,
    RISING_PER_100,
    end_slope,
    load_series,
    main,
    plot_curves,
    write_run_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step: int, **metrics: float) -> str:
    return json.dumps({"step": step, "time": 1.0e9 + step, "metrics": metrics})


def train_metrics(step: int, tps: float, k: int = 3) -> dict[str, float]:
    slots = {f"token_acc_slot{j}": 0.1 * j + 0.001 * step for j in range(1, k + 1)}
    return {"loss": 5.0 - 0.001 * step, "ce": 4.5 - 0.001 * step, "expected_tokens_per_step": tps, **slots}


def eval_metrics(step: int) -> dict[str, float]:
    return {
        "eval/loss": 5.1 - 0.001 * step,
        "eval/ce": 4.6 - 0.001 * step,
        "eval/expected_tokens_per_step": 1.4 + 0.0005 * step,
        "eval/token_acc_slot1": 0.2,
        "eval/token_acc_slot2": 0.3,
        "eval/token_acc_slot3": 0.4,
    }


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as img:
        assert img.size[0] > 400 and img.size[1] > 300


def test_end_slope_is_the_known_slope_of_the_last_quarter(tmp_path):
    """Steep early, then exactly linear at 0.05 tokens/step per 100 steps over the last quarter
    (and a bit before): the fit sees only the end, so it returns 0.05, not the overall trend."""
    lines = []
    for step in range(1, 1001):
        tps = 1.0 + 0.5 * step / 600 if step < 600 else 1.5 + 0.0005 * (step - 600)
        lines.append(record(step, **train_metrics(step, tps)))
        if step % 100 == 0:
            lines.append(record(step, **eval_metrics(step)))
    summary = plot_curves(write(tmp_path / "run" / "metrics.jsonl", lines), tmp_path / "run" / "c.png")
    slope = summary["end_slope"]  # ten held-out points: fitted on their last half
    assert summary["end_slope_basis"] == "held-out"
    assert slope["per_100_steps"] == pytest.approx(0.05, abs=1e-9)
    assert slope["stderr_per_100_steps"] == pytest.approx(0.0, abs=1e-9)
    assert slope["to_step"] == 1000 and slope["from_step"] == 600
    assert summary["held_out_end_slopes_per_100_steps"]["eval/ce"] == pytest.approx(-0.1)
    steps = np.arange(1, 1001, dtype=float)  # the train fit sees only the last quarter
    tps = np.where(steps < 600, 1.0 + 0.5 * steps / 600, 1.5 + 0.0005 * (steps - 600))
    train = end_slope(steps, tps)
    assert train["per_100_steps"] == pytest.approx(0.05, abs=1e-9)
    assert train["to_step"] == 1000 and train["from_step"] == math.ceil(1000 - END_FRACTION * 999)
    assert summary["verdict"].startswith("still rising: more steps would help")
    assert str(RISING_PER_100) in summary["verdict"]  # the threshold is stated
    assert summary["train_points"] == 1000 and summary["eval_points"] == 10
    assert summary["final"]["expected_tokens_per_step"] == pytest.approx(1.7)
    assert summary["final"]["eval/ce"] == pytest.approx(3.6)
    assert summary["final"]["token_acc_slot3"] == pytest.approx(1.3)
    assert_valid_png(tmp_path / "run" / "c.png")


def test_noisy_flat_end_is_flat_and_a_clear_rise_is_not(tmp_path):
    rng = np.random.default_rng(0)
    flat = [record(s, **train_metrics(s, 2.0 + 0.05 * rng.standard_normal())) for s in range(1, 401)]
    summary = plot_curves(write(tmp_path / "flat" / "metrics.jsonl", flat), tmp_path / "flat.png")
    assert summary["verdict"].startswith("flat"), summary["verdict"]
    falling = [record(s, **train_metrics(s, 3.0 - 0.001 * s)) for s in range(1, 401)]
    summary = plot_curves(write(tmp_path / "fall" / "metrics.jsonl", falling), tmp_path / "fall.png")
    assert summary["end_slope"]["per_100_steps"] == pytest.approx(-0.1)
    assert summary["verdict"].startswith("falling")


def test_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
    """Killed after step 60, resumed from the step-40 checkpoint: steps 41-60 are logged twice
    and the second (resumed) values count, once each; eval records of a step stay separate."""
    first = [record(s, **train_metrics(s, 1.0)) for s in range(1, 61)] + [record(40, **eval_metrics(40))]
    second = [record(s, **train_metrics(s, 2.0 + 0.01 * s)) for s in range(41, 101)]
    path = write(tmp_path / "run" / "metrics.jsonl", first + second)
    series, skipped = load_series(path)
    assert skipped == []
    tps = series["expected_tokens_per_step"]
    assert sorted(tps) == list(range(1, 101))
    assert tps[40] == 1.0 and tps[41] == pytest.approx(2.41) and tps[60] == pytest.approx(2.6)
    assert series["eval/ce"] == {40: pytest.approx(4.56)}
    summary = plot_curves(path, tmp_path / "run" / "c.png")
    assert summary["train_points"] == 100
    assert summary["end_slope"]["per_100_steps"] == pytest.approx(1.0)


def test_run_without_eval_records_still_plots(tmp_path):
    path = write(
        tmp_path / "run" / "metrics.jsonl", [record(s, **train_metrics(s, 1.5)) for s in range(1, 21)]
    )
    summary = plot_curves(path, tmp_path / "run" / "c.png")
    assert summary["eval_points"] == 0
    assert not any(k.startswith("eval/") for k in summary["final"])
    assert summary["verdict"].startswith("flat")
    assert_valid_png(tmp_path / "run" / "c.png")


def test_cut_off_line_is_skipped_and_reported_and_nothing_else_is_lost(tmp_path):
    lines = [record(s, **train_metrics(s, 1.5)) for s in range(1, 11)]
    lines[4] = lines[4][:30]  # a record cut off by a kill
    summary = plot_curves(write(tmp_path / "run" / "metrics.jsonl", lines), tmp_path / "c.png")
    assert len(summary["skipped_lines"]) == 1 and summary["skipped_lines"][0].startswith("line 5:")
    assert summary["train_points"] == 9


def test_too_few_points_and_no_training_records(tmp_path):
    two = write(tmp_path / "two" / "metrics.jsonl", [record(s, **train_metrics(s, 1.5)) for s in (1, 2)])
    summary = plot_curves(two, tmp_path / "two.png")
    assert summary["verdict"].startswith("too few")
    assert write_run_curves(tmp_path / "two") == {}  # no slope worth recording
    only_eval = write(tmp_path / "ev" / "metrics.jsonl", [record(4, **eval_metrics(4))])
    with pytest.raises(ValueError, match="no training record"):
        plot_curves(only_eval, tmp_path / "ev.png")


def test_cli_and_hook_write_png_and_never_raise(tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "metrics.jsonl", [record(s, **train_metrics(s, 1.0 + 0.01 * s)) for s in range(1, 41)])
    main([str(run)])
    assert "still rising" in capsys.readouterr().out
    assert_valid_png(run / "learning_curves.png")
    floats = write_run_curves(run)
    assert floats["curves/expected_tokens_per_step_slope_per_100_steps"] == pytest.approx(1.0)
    assert floats["curves/expected_tokens_per_step_rising"] == 1.0
    assert json.loads((run / "learning_curves.json").read_text())["end_slope"]["points"] >= 3
    assert write_run_curves(tmp_path / "missing") == {}  # warns, does not raise
    assert "no learning curves" in capsys.readouterr().err


@pytest.mark.distributed
def test_tiny_training_run_leaves_curves_and_slope(baseline):
    """The session's tiny 2-rank ZeRO-3 run (8 steps, eval every 4)."""
    assert_valid_png(baseline / "learning_curves.png")
    final = json.loads((baseline / "final_metrics.json").read_text())
    slope = final["curves/expected_tokens_per_step_slope_per_100_steps"]
    curves = json.loads((baseline / "learning_curves.json").read_text())
    assert slope == curves["end_slope"]["per_100_steps"] and math.isfinite(slope)
    assert curves["train_points"] == 8 and curves["eval_points"] == 2
    assert (curves["end_slope"]["from_step"], curves["end_slope"]["to_step"]) == (6, 8)
    run_id = json.loads((baseline / "run_info.json").read_text())["run_id"]
    db = sqlite3.connect(baseline / "mlflow.db")
    artifacts = db.execute("select artifact_uri from runs where run_uuid=?", (run_id,)).fetchone()[0]
    art_dir = Path(artifacts.replace("file://", ""))
    assert {"learning_curves.png", "learning_curves.json"} <= {p.name for p in art_dir.iterdir()}
    tag = db.execute("select value from tags where run_uuid=? and key='learning_curves.verdict'", (run_id,))
    assert tag.fetchone()[0] == curves["verdict"]
