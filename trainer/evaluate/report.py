"""The eval stage's outputs beyond eval.json: the printed table, the speed/quality plot, MLflow.

Everything here reads a finished report dict (and the config, for MLflow); nothing decodes, so
the table and the figure can be rebuilt from any eval.json (the demo summary does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hamburger.configio import to_flat_dict
from trainer.evaluate.config import DEFINITIONS, EvalConfig


def table(report: dict) -> str:
    cols = [
        "decoder",
        "confidence",
        "batch_size",
        "tokens_per_macro_step",
        "kv_entries_per_token",
        "tokens_per_s",
        "speedup",
        "micro_calls_per_macro_step",
        "bound",
        "speedup_over_bound",
        "ttft_s",
        "agreement_exact",
        "agreement_prefix",
        "pass_at_1",
        "exact_match",
        "base_nll",
    ]
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in report["runs"]:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        rows.append(" | ".join(cells))
    lines = [
        f"Eval of {report['model']} against {report['base']} ({report['prompts']} prompts, "
        f"max {report['max_new_tokens']} new tokens)",
        "",
        *rows,
        "",
    ]
    for r in report["runs"]:
        if r["decoder"] == "base" and "t_base_s" in r:
            lines.append(
                f"step costs at batch {r['batch_size']}: t_base {1e3 * r['t_base_s']:.3f} ms, t_embed "
                f"{1e3 * r['t_embed_s']:.3f} ms, t_micro {1e3 * r['t_micro_s']:.3f} ms, HAMburger base step "
                f"{1e3 * r['t_hamburger_step_s']:.3f} ms"
            )
    ce = report.get("heldout_ce") or {}
    if ce:
        lines.append(
            f"heldout_ce: HAMburger {ce['hamburger']:.4f}, base {ce['base']:.4f} nats/token "
            f"over {int(ce['tokens'])} reference tokens"
        )
    lines += ["", "Definitions:"] + [f"  {k}: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines)


def quality_axes(runs: list[dict]) -> list[str]:
    """The quality measures to plot: pass@1 where every run has it and it is not zero everywhere
    (else agreement with the base's greedy output), and the base-judged NLL."""
    if all("pass_at_1" in r for r in runs) and any(r["pass_at_1"] > 0 for r in runs):
        return ["pass_at_1", "base_nll"]
    return ["agreement_prefix", "base_nll"]


def plot(report: dict, path: Path) -> None:
    fig = speed_quality_figure(report)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_quality_figure(report: dict):
    """Speed-up (x) against each quality measure (one panel each). Points are labelled (c, batch,
    tau) in a column right of each panel, in the points' vertical order, with leader lines, so
    labels never overlap however close the points are; the base is the star at speed-up 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    measures = quality_axes(runs)
    per_panel = len(runs)
    panel_h = max(2.6, 0.22 * per_panel + 0.6)  # room for one label line per point
    fig, axes = plt.subplots(len(measures), 1, figsize=(8.5, panel_h * len(measures) + 0.8), sharex=True)
    for ax, qual in zip(axes, measures, strict=True):
        points = []  # (x, y, label)
        for bs in sorted({r["batch_size"] for r in runs}):
            ham = sorted(
                (r for r in runs if r["decoder"] == "hamburger" and r["batch_size"] == bs),
                key=lambda r: r["confidence"],
            )
            ax.plot([r["speedup"] for r in ham], [r[qual] for r in ham], "o-", label=f"HAMburger, batch {bs}")
            base = next(r for r in runs if r["decoder"] == "base" and r["batch_size"] == bs)
            ax.plot([1.0], [base[qual]], "k*", markersize=10, label=f"base, batch {bs}")
            points.append((1.0, base[qual], f"base, batch {bs}"))
            for r in ham:
                label = f"c={r['confidence']:g}, batch {bs}: tau {r['tokens_per_macro_step']:.2f}"
                if "bound" in r:
                    label += f", bound {r['bound']:.2f}x"
                points.append((r["speedup"], r[qual], label))
        _label_column(ax, points)
        ax.set_ylabel(qual)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("decode speed-up over the base (tokens/s ratio)")
    fig.suptitle(
        "HAMburger speed/quality across confidence levels (tau = tokens per macro step)", x=0.1, ha="left"
    )
    fig.subplots_adjust(left=0.1, right=0.62, top=0.93, bottom=0.08, hspace=0.25)
    return fig


def _label_column(ax, points: list[tuple[float, float, str]]) -> None:
    """One label per point, stacked evenly in the panel's height right of it (lowest point at the
    bottom), each joined to its point by a thin leader line."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    for slot, i in enumerate(order):
        x, y, text = points[i]
        ax.annotate(
            text,
            (x, y),
            xytext=(1.03, (slot + 0.5) / len(points)),
            textcoords="axes fraction",
            fontsize=7,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 2},
        )


def log_mlflow(cfg: EvalConfig, report: dict, out_dir: Path, lineage: dict) -> None:
    if not cfg.mlflow.enabled:
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    import mlflow

    from trainer.train.tracking import default_tracking_uri, experiment_id, flatten_params

    uri = default_tracking_uri(str(out_dir), cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), cfg.mlflow.experiment, uri))
    with mlflow.start_run(run_name=cfg.mlflow.run_name or "eval") as run:
        mlflow.set_tags(
            {
                "stage": "eval",
                "source_run_id": str(lineage.get("source_run_id")),
                "model": report["model"],
                "base": report["base"],
            }
        )
        mlflow.log_params(flatten_params("", {k: v for k, v in to_flat_dict(cfg).items()}))
        for r in report["runs"]:
            prefix = "base" if r["decoder"] == "base" else f"ham_c{r['confidence']}"
            step = 0 if r["decoder"] == "base" else int(round(r["confidence"] * 100))
            mlflow.log_metrics(
                {
                    f"{prefix}/bs{r['batch_size']}/{k}": float(v)
                    for k, v in r.items()
                    if isinstance(v, float | int) and not isinstance(v, bool) and k != "batch_size"
                },
                step=step,
            )
        for k, v in (report.get("heldout_ce") or {}).items():
            mlflow.log_metric(f"heldout_ce/{k}", float(v))
        mlflow.log_artifact(str(out_dir / "eval.json"))
        mlflow.log_artifact(str(out_dir / "speed_quality.png"))
        report["mlflow_run_id"] = run.info.run_id
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
