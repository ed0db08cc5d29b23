"""Decode speed on CPU: HAMburger (a briefly trained export) against its base, batch 1 and 8.

    python bench/bench_decode.py EXPORT_DIR [--prompts 16] [--max-new 48]
EXPORT_DIR defaults to the demo's export (outputs/demo/export, from ./launch.sh demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from trainer.evaluate.config import DEFINITIONS, EvalConfig  # noqa: E402
from trainer.evaluate.evaluate import evaluate  # noqa: E402
from trainer.train.config import MLflowConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="outputs/demo/export")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-json", default="", help="format an existing eval.json (e.g. the demo's) instead")
    args = ap.parse_args()
    if args.from_json:
        import json

        report = json.loads(Path(args.from_json).read_text())
        args.max_new = report["max_new_tokens"]
        write_table(report, args)
        return
    cfg = EvalConfig(
        model=args.model,
        max_prompts=args.prompts,
        max_new_tokens=args.max_new,
        batch_sizes=[1, 8],
        confidences=[0.5, 0.7, 0.9],
        output_dir="outputs/bench_decode",
        mlflow=MLflowConfig(enabled=False),
    )
    cfg.validate()
    report = evaluate(cfg)
    write_table(report, args)


def write_table(report: dict, args) -> None:
    lines = [
        f"{report['prompts']} held-out prompts of the demo data, up to {args.max_new} new tokens, "
        f"model `{args.model}` against `{report['base']}`, fp32 on CPU.",
        "",
        "| decoder | confidence | batch | tokens/s | speed-up | tokens per macro step | base forwards per token "
        "| KV entries per token | agreement (prefix) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        conf = r.get("confidence", "")
        lines.append(
            f"| {r['decoder']} | {conf} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
            f"{r.get('speedup', 1.0):.2f}x | {r['tokens_per_macro_step']:.3f} | "
            f"{1 / r['tokens_per_macro_step']:.3f} | {r['kv_entries_per_token']:.3f} | "
            f"{r['agreement_prefix']:.3f} |"
        )
    lines += [
        "",
        "Definitions: "
        + "; ".join(
            f"**{k}**: {v}"
            for k, v in DEFINITIONS.items()
            if k in ("tokens_per_macro_step", "kv_entries_per_token", "speedup", "agreement_prefix")
        ),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Fast decode on CPU: HAMburger vs base", body)


if __name__ == "__main__":
    main()
