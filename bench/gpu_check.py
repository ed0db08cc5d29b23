"""The GPU check: every number the GPU goals need, from one call, written as JSON + markdown.

    bash bench/gpu_check.sh                 # on the GPU machine (system python3, no network)
    python bench/gpu_check.py --tiny --out DIR   # the same code at tiny shapes (CI, CPU)

Models are built from the SmolLM2-135M and Llama-3.2-1B configurations with random weights
(speed does not depend on the values; no weights travel). Sections, in order of importance,
each skipped (and reported as skipped) once --deadline-s has passed:
- checks: FlexAttention vs the dense mask (loss and gradients; loss only on CPU, where flex has
  no backward) and graphed vs eager decoding (token for token), on a tiny fp32 model;
- decode: per-step costs t_base, t_micro, t_embed at each batch size, static without and with
  CUDA graphs, and tokens/s of HAMburger against the base at forced segment lengths
  (tau = 1.5, 2.0, 2.5; the decoder's benchmark-only `forced_seg_lens` switch), each case
  with the bound tau * t_base / (t_base + t_embed + m * t_micro), m = micro-decoder calls per
  macro step actually run; rows of equal lengths, rows drawing lengths independently, and
  (batch > 1) the same drawn lengths through the batch-aware micro loop (drawn_aware);
- label: data_prep's scorer at the paper's batch_tokens and vocabulary (tokens/s, peak memory)
  against a plain forward of the same batches;
- train: HAMburger (K=4) vs plain SFT (K=1) under ZeRO-3 on one device, bf16 on GPU, one packed
  row of row_capacity macro positions per step, dense mask vs FlexAttention (tokens/s, peak
  memory, MFU): 20 timed steps over 4 different rows, one engine per table row (freed before
  the next), and a profiler summary of one step (device busy time, host share, top kernels);
  the 1B and 135M shapes, then a 3B shape if the deadline allows;
- serve: continuous batching as the server runs it (bench/gpu_check_serve.py), HAMburger and
  the base through the slot batch (graphed) and through the eager batch, at concurrency 1, 8,
  32 and 64; HAMburger also with forced row-varying lengths at tau 2, batch-aware off and on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from gpu_check_models import free
from gpu_check_sections import section_checks, section_decode, section_label, section_train
from gpu_check_serve import section_serve


# ---------------------------------------------------------------- report
def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, "
        f"{'tiny shapes (dry run)' if env['tiny'] else 'full shapes'}, {report['seconds']:.0f} s",
        "",
    ]
    for name, sec in report["sections"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "error" in sec or "skipped" in sec:
            lines += [
                f"**{'skipped' if 'skipped' in sec else 'failed'}**: {sec.get('skipped') or sec['error']}",
                "",
            ]
            continue
        for err in sec.get("errors", []):
            lines += [f"**failed**: {err}", ""]
        if name.startswith("checks"):
            lines += [f"- {k}: {v}" for k, v in sec.items()] + [""]
        elif name.startswith("decode"):
            lines += [
                "mode static: the static decoder's steps run as eager kernels; graphed: replayed CUDA graphs. "
                "tau: tokens per macro step of the run (forced lengths, see case); m: micro-decoder calls per "
                "macro step; bound: tau t_base / (t_base + t_embed + m t_micro); eager base: the eager "
                "(batched_decode) base decoder, for reference.",
                "",
                "| batch | mode | case | tau | m | tokens/s | base tokens/s | speed-up | bound | measured/bound "
                "| t_base ms | t_micro ms | t_embed ms | eager base tokens/s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sec["rows"]:
                lines.append(
                    f"| {r['batch']} | {r['mode']} | {r['case']} | {r['tau_measured']:.2f} | {r['m']:.2f} | "
                    f"{r['tokens_per_s']:.0f} | {r['base_tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                    f"{r['bound']:.2f}x | {r['speedup_over_bound']:.2f} | {1e3 * r['t_base']:.3f} | "
                    f"{1e3 * r['t_micro']:.3f} | {1e3 * r['t_embed']:.3f} | {r['eager_base_tokens_per_s']:.0f} |"
                )
            lines.append("")
        elif name.startswith("serve"):
            lines += [
                "| server | decode | concurrency | confidence / lengths | batch-aware | tokens/s "
                "| tokens per macro step | vs base (same decode) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sec["rows"]:
                aware = "on" if r.get("batch_aware") else ""
                lines.append(
                    f"| {r['server']} | {r['decode']} | {r['concurrency']} | {r['confidence'] or ''} | {aware} | "
                    f"{r['tokens_per_s']:.0f} | {r['tokens_per_macro_step']:.2f} | {r['vs_base_same_decode']:.2f}x |"
                )
            lines.append("")
        elif name.startswith("label"):
            lines += [f"- {k}: {v}" for k, v in sec.items()] + [""]
        elif name.startswith("train"):
            lines += [
                "| K | attention | tokens/step | step s (mean) | p50 | max | tokens/s | peak GiB | MFU |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sec["rows"]:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
                lines.append(
                    f"| {r['K']} | {r['attention']} | {r['tokens']:.0f} | {r['step_s']:.3f} | "
                    f"{r['step_s_p50']:.3f} | {r['step_s_max']:.3f} | {r['tokens_per_s']:.0f} | {peak} | {mfu} |"
                )
            by = {(r["K"], r["attention"]): r["tokens_per_s"] for r in sec["rows"]}
            for att in sorted({r["attention"] for r in sec["rows"]}):
                if (4, att) in by and (1, att) in by:
                    lines.append(
                        f"- {att}: HAMburger / plain SFT tokens/s = {by[(4, att)] / by[(1, att)]:.2f}x"
                    )
            for run, prof in sec.get("profiles", {}).items():
                share = (
                    f", host share {100 * prof['host_share']:.0f}%" if prof["host_share"] is not None else ""
                )
                top = "; ".join(f"{t['name'][:60]} {t['self_ms']:.1f} ms" for t in prof["top"][:5])
                lines.append(f"- profile {run}: step {prof['wall_s']:.3f} s{share}; top: {top}")
            failures = {k: v for k, v in sec.get("flex_compile_failures", {}).items() if v}
            if failures:
                lines.append(f"**FlexAttention ran uncompiled** (compile failed): {failures}")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    ap.add_argument("--work", default="/tmp/hamburger-gpu-check", help="scratch folder (random base models)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CI dry run of this same script")
    ap.add_argument("--sections", default="checks,decode,label,train,serve")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="skip what would start after this")
    ap.add_argument(
        "--manifest", default="", help="a prep manifest.json whose segment histogram to draw from"
    )
    args = ap.parse_args(argv)
    if args.tiny:
        args.decode_models, args.train_models, args.label_models = ["tiny"], ["tiny"], ["tiny"]
        args.batch_sizes, args.prompt_len, args.max_new = [1, 3], 8, 12
        args.label_batch_tokens, args.label_len = 256, 64
        args.row_capacity, args.train_steps, args.train_warmup, args.train_batches = 96, 2, 1, 2
        args.serve_models, args.serve_concurrency = ["tiny"], [1, 3]
    else:
        args.decode_models = ["llama-3.2-1b", "smollm2-135m"]
        args.train_models = ["llama-3.2-1b", "smollm2-135m"]
        args.late_train_models = ["llama-3.2-3b"]  # after every other section: if the deadline allows
        args.label_models = ["llama-3.2-1b"]
        args.batch_sizes, args.prompt_len, args.max_new = [1, 8, 32], 64, 128
        args.label_batch_tokens, args.label_len = 65536, 1024
        args.row_capacity, args.train_steps, args.train_warmup, args.train_batches = 8192, 20, 2, 4
        args.serve_models, args.serve_concurrency = ["llama-3.2-1b"], [1, 8, 32, 64]
    args.taus = [1.5, 2.0, 2.5]
    return args


def plan(args) -> list[tuple[str, callable, tuple]]:
    """(name, function, extra args) in the order they run: the most important first."""
    wanted = set(args.sections.split(","))
    units = [("checks", section_checks, ())] if "checks" in wanted else []
    first, rest = args.decode_models[0], args.decode_models[1:]
    if "decode" in wanted:
        units.append((f"decode {first}", section_decode, (first,)))
    if "label" in wanted:
        units += [(f"label {m}", section_label, (m,)) for m in args.label_models]
    if "train" in wanted:
        units += [(f"train {m}", section_train, (m,)) for m in args.train_models]
    if "serve" in wanted:
        units += [(f"serve {m}", section_serve, (m,)) for m in args.serve_models]
    if "decode" in wanted:
        units += [(f"decode {m}", section_decode, (m,)) for m in rest]
    if "train" in wanted:
        units += [(f"train {m}", section_train, (m,)) for m in getattr(args, "late_train_models", [])]
    return units


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = {
        "env": {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tiny": args.tiny,
        },
        "sections": {},
    }
    failed = False
    for name, fn, extra in plan(args):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline_s:
            report["sections"][name] = {"skipped": f"deadline ({elapsed:.0f} s > {args.deadline_s:.0f} s)"}
            continue
        print(f"[gpu_check] {name} (at {elapsed:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][name] = fn(args, device, *extra)
        except Exception as exc:  # keep every other number; fail at the end
            traceback.print_exc()
            report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
            free(device)
        if report["sections"][name].get("errors"):
            failed = True
        report["sections"][name]["seconds"] = time.perf_counter() - t0
        report["seconds"] = time.perf_counter() - t_start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # after every section
    report["seconds"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    print(md, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
