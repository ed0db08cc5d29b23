"""The batch-aware micro loop on CPU: HAMburger and its base through the same static decoder at
batch 1, 8 and 16, with the micro loop knowing its batch (cutoff t_micro / t_macro, measured)
and without.

Two kinds of segment lengths:
- forced: a random-weight SmolLM2-135M shape whose rows draw segment lengths independently with
  mean tau in {1.5, 2.0, 2.5} (the decoder's benchmark-only `forced_seg_lens` switch);
- the model's own: a trained export (--model, e.g. the recipe ablation's) deciding with its
  stop head at c = 0.5 on its held-out prompts (--data, a prep folder).

Each cell is the best of --reps interleaved runs in this one process, the order reversed every
other rep (the machine is noisy, so ratios are what to read; at batch 1 on and off run the same
code, so their ratio there is the noise floor). Columns: tokens per macro step, micro calls per macro step (m), the
share of macro steps whose micro loop the rule ended early, tokens/s, and the speed-up over
the base with the rule off and on.

    python bench/bench_batch_aware.py [--model EXPORT --data PREP] [--reps 3] [--max-new 48]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_models import draw, random_hamburger, segment_distribution, tilted  # noqa: E402
from report import write_section  # noqa: E402

from hamburger.decode.static import StaticBaseDecoder, StaticHAMburgerDecoder  # noqa: E402


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model, prompts, max_new: int, reps: int, forced, confidence: float) -> dict:
    """Base, HAMburger without and with the rule, interleaved, on one batch of prompts."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    base = StaticBaseDecoder(model.base, batch, width, max_new, graphs=False)
    ham = StaticHAMburgerDecoder(model, batch, width, max_new, graphs=False)
    cutoff = ham.measure_cutoff() if batch > 1 else 0.0
    out = {"batch": batch, "cutoff": cutoff}
    for name, c in (("off", 0.0), ("on", cutoff)):
        ham.micro_calls = ham.macro_steps = ham.cuts = 0
        res = ham.generate(prompts, set(), confidence, forced_seg_lens=forced, micro_cutoff=c)
        out[f"tau_{name}"] = sum(len(r.tokens) for r in res) / sum(len(r.seg_lens) for r in res)
        out[f"m_{name}"] = ham.micro_calls / ham.macro_steps
        out[f"cut_share_{name}"] = ham.cuts / ham.macro_steps
    runs = {
        "base": lambda: base.generate(prompts, set()),
        "off": lambda: ham.generate(prompts, set(), confidence, forced_seg_lens=forced),
        "on": lambda: ham.generate(prompts, set(), confidence, forced_seg_lens=forced, micro_cutoff=cutoff),
    }
    for fn in runs.values():
        fn()  # warm-up
    seconds = {k: [] for k in runs}
    order = list(runs)
    for rep in range(reps):  # interleaved, the order reversed every other rep (no one is always last)
        for k in order if rep % 2 == 0 else order[::-1]:
            seconds[k].append(best(runs[k], 1))
    for k in runs:
        out[f"tps_{k}"] = batch * max_new / min(seconds[k])
    out["speedup_off"] = out["tps_off"] / out["tps_base"]
    out["speedup_on"] = out["tps_on"] / out["tps_base"]
    return out


def forced_rows(args) -> list[dict]:
    model = random_hamburger("smollm2-135m", torch.device("cpu"), torch.float32)
    rng = random.Random(0)
    probs = segment_distribution("", 4)
    rows = []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(3, 49152) for _ in range(32)] for _ in range(batch)]
        for tau in (1.5, 2.0, 2.5):
            forced = torch.tensor([draw(rng, tilted(probs, tau), 512) for _ in range(batch)])
            rows.append(
                {
                    "lengths": f"forced, tau {tau}",
                    **measure(model, prompts, args.max_new, args.reps, forced, 0.5),
                }
            )
            print(rows[-1], flush=True)
    return rows


def model_rows(args) -> list[dict]:
    from data_prep.shards import read_split
    from hamburger.model import load_model

    model = load_model(args.model, dtype=torch.float32).eval()
    table = read_split(args.data, "eval").to_pylist()
    prompts = [r["input_ids"][: r["prompt_len"]] for r in table]
    rows = []
    for batch in args.batch_sizes:
        if batch > len(prompts):
            continue
        rows.append(
            {
                "lengths": "the model's own, c=0.5",
                **measure(model, prompts[:batch], args.max_new, args.reps, None, 0.5),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a trained export folder (its own stop decisions)")
    ap.add_argument("--data", default="", help="its prep folder (held-out prompts)")
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(2)
    with torch.no_grad():
        rows = forced_rows(args) + (model_rows(args) if args.model else [])
    lines = [
        f"Static decoder, fp32, CPU, {args.max_new} new tokens per row, best of {args.reps} interleaved runs. "
        "off: the micro loop runs while any row continues; on: rows end their segments when fewer "
        "than `cutoff` (t_micro / t_macro, measured at that batch) of the unfinished rows go on. "
        "cut share: macro steps whose micro loop the rule ended.",
        "",
        "| lengths | batch | cutoff | tau off | tau on | m off | m on | cut share | base tok/s "
        "| off tok/s | on tok/s | speed-up off | speed-up on | on / off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lengths']} | {r['batch']} | {r['cutoff']:.2f} | {r['tau_off']:.2f} | {r['tau_on']:.2f} | "
            f"{r['m_off']:.2f} | {r['m_on']:.2f} | {r['cut_share_on']:.2f} | {r['tps_base']:.1f} | "
            f"{r['tps_off']:.1f} | {r['tps_on']:.1f} | {r['speedup_off']:.2f}x | {r['speedup_on']:.2f}x | "
            f"{r['tps_on'] / r['tps_off']:.2f} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Batch-aware micro loop (CPU)", body)


if __name__ == "__main__":
    main()
