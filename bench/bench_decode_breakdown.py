"""Where an eager batch's decode time goes: base vs HAMburger with forced row-varying lengths (CPU).

    python bench/bench_decode_breakdown.py [--max-tokens 32,64] [--tau 2] [--batch 8] [--requests 16]

The same model pair as bench_serve.py (SmolLM2-135M-Instruct, 30 layers, and it with freshly
initialised HAMburger modules), decoded in process with the continuous batch the server runs
(`decode_all`, eager steppers, one thread), no HTTP in between. HAMburger draws each request's
segment lengths with mean --tau over 1..K (hamburger/decode/forced.py), batch-aware micro loop
off and on. Every request decodes exactly --max-tokens. The time of each stepper call is summed
by kind: prefill (joiners' prompts, the same work for both models), advance (the base model's
step: for HAMburger the embedder and the layers), segments (for HAMburger the base head's
first token and the micro steps; for the base only its argmax). Base runs first and last; the
faster of the two is kept, so the ratio does not flatter HAMburger.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import bench_prompts, build_models  # noqa: E402
from report import write_section  # noqa: E402

from hamburger.decode.continuous import ContinuousBatch, Sequence, decode_all  # noqa: E402
from hamburger.decode.forced import forced_lengths  # noqa: E402
from trainer.serve.loader import load_for_serving  # noqa: E402

SECTION = "Eager batch decode: where the time goes, HAMburger vs base (CPU)"
PARTS = ("prefill", "advance", "segments")


def timed(obj: object, name: str, totals: dict[str, float]) -> None:
    """Wrap obj.name so each call's wall time is added to totals[name]."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)


def run(folder: Path, prompts: list[str], n: int, tau: float | None, aware: bool, batch: int) -> dict:
    """Decode every prompt to exactly n tokens; return wall time, tokens, tau, micro calls and parts."""
    lm = load_for_serving(str(folder))
    tok = lm.tokenizer
    totals: dict[str, float] = collections.defaultdict(float)
    for part in PARTS:
        timed(lm.stepper, part, totals)
    cb = ContinuousBatch(lm.stepper, lm.eos, batch_aware=aware)
    seqs = []
    for p in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        s = Sequence(prompt_ids=list(ids), max_new_tokens=n, ignore_eos=True)
        if tau:
            s.forced_lens = forced_lengths(tau, 4, zlib.crc32(str(ids).encode()))
        seqs.append(s)
    t0 = time.perf_counter()
    decode_all(cb, seqs, max_batch=batch)
    wall = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in seqs)
    segs = sum(len(s.seg_lens) for s in seqs)
    return {"wall": wall, "tokens": tokens, "tau": tokens / max(segs, 1), "micro": cb.micro_calls, **totals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", default="32,64")
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_breakdown-"))
    folders = build_models(work, 30)
    prompts = bench_prompts(args.requests)
    lines = [
        f"{args.requests} requests, batch {args.batch}, forced tau {args.tau:g}. Seconds per part; "
        "the ratio is HAMburger's tokens/s over the faster base run.",
        "",
        "| new tokens | model | tokens/s | ratio | tau | micro calls | prefill s | advance s | segments s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in (int(x) for x in args.max_tokens.split(",")):
        first = run(folders["base"], prompts, n, None, False, args.batch)
        ham = [run(folders["ham"], prompts, n, args.tau, aware, args.batch) for aware in (False, True)]
        last = run(folders["base"], prompts, n, None, False, args.batch)
        base = min(first, last, key=lambda r: r["wall"])
        base_tps = base["tokens"] / base["wall"]
        for name, r in (
            ("base", base),
            ("HAMburger, batch-aware off", ham[0]),
            ("HAMburger, batch-aware on", ham[1]),
        ):
            tps = r["tokens"] / r["wall"]
            lines.append(
                f"| {n} | {name} | {tps:.1f} | {tps / base_tps:.2f} | {r['tau']:.2f} | {r['micro']} | "
                + " | ".join(f"{r.get(p, 0.0):.2f}" for p in PARTS)
                + " |"
            )
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
