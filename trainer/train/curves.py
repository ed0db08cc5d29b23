"""Learning curves of a training run, drawn from its `metrics.jsonl` (the source of truth).

One PNG with four panels (expected tokens/step, slot accuracies, cross-entropy, loss) and a
summary whose main number is the end slope of expected tokens/step: still rising at the end of
training means more steps would still buy decoding speed, flat means they would not.
`./launch.sh curves RUN_DIR` (in the project's environment) writes RUN_DIR/learning_curves.png and prints the summary;
the trainer does the same when a run finishes (`write_run_curves`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

TPS = "expected_tokens_per_step"
END_FRACTION = 0.25  # the end slope is fitted over the last quarter of the logged train steps
EVAL_END_FRACTION = 0.5  # ... or over the last half of the held-out points, when there are enough
MIN_EVAL_POINTS = 5  # held-out points needed to judge on them (the same rows every time: no batch noise)
MIN_FIT_POINTS = 3  # a slope with a standard error needs at least three points
RISING_PER_100 = 0.01  # tokens/step gained per 100 steps below which more steps barely pay
SLOT_KEY = re.compile(r"^(eval/)?token_acc_slot(\d+)$")

Series = dict[str, dict[int, float]]  # metric name -> step -> value


# ---------------------------------------------------------------- reading
def load_series(metrics_jsonl: Path) -> tuple[Series, list[str]]:
    """Every metric's values by step. A step logged again after a resume keeps its last value
    (per metric: train and eval records of one step are separate lines). Unreadable lines (a
    record cut off by a kill) are skipped and returned as 'line N: why' so callers report them."""
    series: Series = {}
    skipped: list[str] = []
    for n, line in enumerate(Path(metrics_jsonl).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, metrics = int(rec["step"]), rec["metrics"]
            values = {str(k): float(v) for k, v in metrics.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            skipped.append(f"line {n}: {type(e).__name__}: {str(e)[:80]}")
            continue
        for key, value in values.items():
            series.setdefault(key, {})[step] = value
    return series, skipped


def as_arrays(points: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[int(s)] for s in steps], dtype=float)


def slot_numbers(series: Series) -> list[int]:
    """The slots 1..K that have accuracies (train or eval), in order."""
    return sorted({int(m.group(2)) for key in series if (m := SLOT_KEY.match(key))})


# ---------------------------------------------------------------- numbers
def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start, so no point is lost)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def smoothing_window(n: int) -> int:
    return max(1, min(50, n // 10))


def end_slope(steps: np.ndarray, values: np.ndarray, fraction: float = END_FRACTION) -> dict | None:
    """Least-squares slope (per 100 steps) and its standard error over the last `fraction` of
    the logged steps, on raw values (smoothing would lag the end). None below two points."""
    if len(steps) < 2:
        return None
    start = steps[-1] - fraction * (steps[-1] - steps[0])
    keep = steps >= start
    if keep.sum() < MIN_FIT_POINTS:
        keep = np.arange(len(steps)) >= len(steps) - MIN_FIT_POINTS
    x, y = steps[keep], values[keep]
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    slope = float((dx * (y - y.mean())).sum()) / sxx
    stderr = None  # two points fit any line exactly: no error estimate
    if len(x) > 2:
        resid = y - y.mean() - slope * dx
        stderr = 100 * math.sqrt(float((resid * resid).sum()) / (len(x) - 2) / sxx)
    return {
        "per_100_steps": 100 * slope,
        "stderr_per_100_steps": stderr,
        "intercept_at_end": float(y.mean() + slope * (x[-1] - x.mean())),
        "from_step": int(x[0]),
        "to_step": int(x[-1]),
        "points": int(len(x)),
    }


def verdict(slope: dict | None, threshold: float = RISING_PER_100) -> str:
    """'still rising' only when the slope beats the threshold and two standard errors (noise
    in the raw per-step values must not read as a trend)."""
    if slope is None or slope["stderr_per_100_steps"] is None:
        return f"too few logged train steps to judge the trend (need {MIN_FIT_POINTS})"
    s, e = slope["per_100_steps"], slope["stderr_per_100_steps"]
    where = (
        f"slope {s:+.4f} tokens/step per 100 steps (+/- {e:.4f}) over steps "
        f"{slope['from_step']}-{slope['to_step']}; threshold {threshold} per 100 steps and 2 standard errors"
    )
    if s > threshold and s > 2 * e:
        return f"still rising: more steps would help ({where})"
    if s < -threshold and -s > 2 * e:
        return f"falling: more steps would not help ({where})"
    return f"flat: more steps would barely help ({where})"


def summarize(series: Series, skipped: list[str], threshold: float = RISING_PER_100) -> dict:
    """Final values, the end slope of expected tokens/step and the verdict.

    The slope is fitted on the held-out points when there are at least MIN_EVAL_POINTS (the
    same rows at every evaluation, so the trend is not drowned by which samples a training
    batch happened to hold), else on the training steps. The held-out slopes of slot-2
    accuracy and CE are reported beside it: the micro decoder can still be learning while the
    stop head holds expected tokens/step level."""
    steps, values = as_arrays(series[TPS])
    held_out = series.get(f"eval/{TPS}", {})
    if len(held_out) >= MIN_EVAL_POINTS:
        basis = "held-out"
        slope = end_slope(*as_arrays(held_out), EVAL_END_FRACTION)
    else:
        basis = "train"
        slope = end_slope(steps, values)
    also = {}
    for key in ("eval/token_acc_slot2", "eval/ce"):
        if len(series.get(key, {})) >= MIN_EVAL_POINTS:
            fit = end_slope(*as_arrays(series[key]), EVAL_END_FRACTION)
            also[key] = fit["per_100_steps"] if fit else None
    final_keys = [TPS, f"eval/{TPS}", "loss", "ce", "eval/ce", "eval/loss"]
    final_keys += [f"{p}token_acc_slot{k}" for p in ("", "eval/") for k in slot_numbers(series)]
    final = {k: series[k][max(series[k])] for k in final_keys if series.get(k)}
    final[f"{TPS}_smoothed"] = float(moving_average(values, smoothing_window(len(values)))[-1])
    return {
        "last_step": int(steps[-1]),
        "train_points": len(steps),
        "eval_points": len(held_out),
        "final": final,
        "end_slope": slope,
        "end_slope_basis": basis,
        "held_out_end_slopes_per_100_steps": also,
        "threshold_per_100_steps": threshold,
        "verdict": f"{verdict(slope, threshold)} [{basis}]",
        "skipped_lines": skipped,
    }


# ---------------------------------------------------------------- drawing
def plot_curves(metrics_jsonl: Path, out_png: Path, threshold: float = RISING_PER_100) -> dict:
    """Draw `out_png` from `metrics_jsonl`; returns the summary (see `summarize`)."""
    series, skipped = load_series(metrics_jsonl)
    if not series.get(TPS):
        raise ValueError(f"{metrics_jsonl}: no training record has '{TPS}': nothing to plot")
    summary = summarize(series, skipped, threshold)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _panel_tps(axes[0, 0], series, summary["end_slope"])
    _panel_slots(axes[0, 1], series)
    _panel_pair(axes[1, 0], series, "ce", "cross-entropy (train, held-out)")
    _panel_pair(axes[1, 1], series, "loss", "loss (train, held-out)")
    fig.suptitle(f"{Path(metrics_jsonl).parent.name}: {summary['verdict'].split(' (')[0]}", fontsize=11)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    summary["png"] = str(out_png)
    return summary


def _train_line(ax, points: dict[int, float], label: str, color=None, raw: bool = True) -> None:
    steps, values = as_arrays(points)
    if raw:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    window = smoothing_window(len(values))
    ax.plot(steps, moving_average(values, window), color=color, label=f"{label} (mean of {window})")


def _eval_points(ax, points: dict[int, float], label: str, color=None) -> None:
    if points:
        steps, values = as_arrays(points)
        ax.plot(steps, values, "o--", color=color, markersize=4, linewidth=0.8, label=label)


def _no_eval_note(ax, series: Series) -> None:
    if not any(k.startswith("eval/") for k in series):
        ax.text(0.5, 0.02, "no held-out records", transform=ax.transAxes, ha="center", fontsize=8)


def _panel_tps(ax, series: Series, slope: dict | None) -> None:
    _train_line(ax, series[TPS], "train", color="C0")
    _eval_points(ax, series.get(f"eval/{TPS}", {}), "held-out", color="C3")
    if slope is not None:
        x = np.array([slope["from_step"], slope["to_step"]], dtype=float)
        y = slope["intercept_at_end"] + slope["per_100_steps"] / 100 * (x - x[-1])
        ax.plot(x, y, "k-", linewidth=2, label=f"end slope {slope['per_100_steps']:+.3f}/100 steps")
    _no_eval_note(ax, series)
    title = "expected tokens/step"
    labelled = series.get("labelled_tokens_per_step")
    if labelled:  # the ceiling, as a number: drawn, it would flatten the curve that matters
        title += f" (labelled best case at the end: {labelled[max(labelled)]:.2f})"
    ax.set_title(title)
    _finish(ax)


def _panel_slots(ax, series: Series) -> None:
    for i, k in enumerate(slot_numbers(series)):
        if series.get(f"token_acc_slot{k}"):
            _train_line(ax, series[f"token_acc_slot{k}"], f"slot {k}", color=f"C{i}", raw=False)
        _eval_points(ax, series.get(f"eval/token_acc_slot{k}", {}), f"slot {k} held-out", color=f"C{i}")
    _no_eval_note(ax, series)
    ax.set_title("token accuracy by slot")
    _finish(ax)


def _panel_pair(ax, series: Series, key: str, title: str) -> None:
    if series.get(key):
        _train_line(ax, series[key], "train", color="C0")
    _eval_points(ax, series.get(f"eval/{key}", {}), "held-out", color="C3")
    _no_eval_note(ax, series)
    ax.set_title(title)
    _finish(ax)


def _finish(ax) -> None:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


# ---------------------------------------------------------------- the trainer's hook
def write_run_curves(out_dir: Path, tracker=None) -> dict[str, float]:
    """At the end of training (rank 0): learning_curves.png/.json in the output folder, both
    logged to the MLflow run, the verdict as a tag. Returns the floats for final_metrics.json.
    A finished run never fails here: any error is a warning and an empty result."""
    out_dir = Path(out_dir)
    try:
        summary = plot_curves(out_dir / "metrics.jsonl", out_dir / "learning_curves.png")
        (out_dir / "learning_curves.json").write_text(json.dumps(summary, indent=1))
        print(f"[train] learning curves: {summary['verdict']}", flush=True)
        if summary["skipped_lines"]:
            print(f"[train] warning: learning curves skipped {summary['skipped_lines']}", flush=True)
        if tracker is not None:
            tracker.log_artifact(out_dir / "learning_curves.png")
            tracker.log_artifact(out_dir / "learning_curves.json")
            tracker.set_tags({"learning_curves.verdict": summary["verdict"][:5000]})
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training run
        print(f"[train] warning: no learning curves ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return {}
    slope = summary["end_slope"]
    if slope is None or slope["stderr_per_100_steps"] is None:
        return {}
    return {
        f"curves/{TPS}_slope_per_100_steps": slope["per_100_steps"],
        f"curves/{TPS}_slope_stderr_per_100_steps": slope["stderr_per_100_steps"],
        f"curves/{TPS}_rising": float(summary["verdict"].startswith("still rising")),
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: ./launch.sh curves RUN_DIR")
    run_dir = Path(args[0])
    if not (run_dir / "metrics.jsonl").is_file():
        raise SystemExit(
            f"{run_dir / 'metrics.jsonl'} does not exist (is {run_dir} a training output folder?)"
        )
    try:
        summary = plot_curves(run_dir / "metrics.jsonl", run_dir / "learning_curves.png")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(summary, indent=1))
    print(summary["verdict"])


if __name__ == "__main__":
    main()
