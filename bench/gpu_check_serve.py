"""The GPU check's serving section: continuous batching as the server runs it, in process.

At each concurrency c, 2c requests arrive together and are decoded to the end at most c at a
time, joining as rows leave (decode_all, the pyfunc's loop; the server's scheduler does the
same at each macro-step boundary). Each request decodes exactly max_new tokens (ignore_eos).
HAMburger (random weights: its stop head says P(continue) ~ 0.5, so c = 0.3 gives K-token
segments and 0.9 one-token segments) and its base, each through the slot batch on the static
decoder (graphed on a GPU; hamburger/decode/slots.py) and through the eager ContinuousBatch.
"""

from __future__ import annotations

import random
import time

import torch
from gpu_check_models import free, random_hamburger  # first: it puts the repo root on sys.path

from hamburger.decode.continuous import BaseStepper, ContinuousBatch, HAMburgerStepper, Sequence, decode_all
from hamburger.decode.forced import forced_lengths
from hamburger.decode.slots import SlotBatch
from hamburger.decode.timing import sync

FORCED_TAU = "forced tau 2.0"
"""The serving case with drawn row-varying segment lengths (mean 2 over 1..4), batch-aware off and on."""


def section_serve(args, device, shape: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_hamburger(shape, device, dtype)
    rng = random.Random(0)
    vocab = model.base.config.vocab_size
    fast = "graphed" if device.type == "cuda" else "static"
    rows, errors = [], []
    for c in args.serve_concurrency:
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(2 * c)]
        for kind, aware, cases in (
            ("hamburger", False, (0.3, 0.9, FORCED_TAU)),
            ("hamburger", True, (FORCED_TAU,)),
            ("base", False, (None,)),
        ):
            for decode in (fast, "eager"):
                try:
                    batch = make_batch(model, kind, decode, c, args, aware)
                    for case in cases:
                        rows.append(
                            run(batch, prompts, c, case, args.max_new, device, model.config.max_segment_len)
                            | {
                                "model": shape,
                                "server": kind,
                                "decode": decode,
                                "concurrency": c,
                                "batch_aware": aware,
                            }
                        )
                except Exception as exc:  # keep the other rows
                    errors.append(f"{kind} {decode} c={c}: {type(exc).__name__}: {exc}")
                free(device)
    base = {(r["decode"], r["concurrency"]): r["tokens_per_s"] for r in rows if r["server"] == "base"}
    for r in rows:
        r["vs_base_same_decode"] = r["tokens_per_s"] / base[(r["decode"], r["concurrency"])]
    del model
    free(device)
    return {"rows": rows, "errors": errors, "prompt_len": args.prompt_len, "max_new": args.max_new}


def make_batch(model, kind: str, decode: str, slots: int, args, batch_aware: bool = False):
    lm = model if kind == "hamburger" else model.base
    if decode == "eager":
        stepper = HAMburgerStepper(lm) if kind == "hamburger" else BaseStepper(lm)
        return ContinuousBatch(stepper, set(), 0, next(lm.parameters()).device, batch_aware)
    return SlotBatch(
        lm, slots, args.prompt_len, args.max_new, set(), graphs=decode == "graphed", batch_aware=batch_aware
    )


def run(batch, prompts, c: int, case, max_new: int, device, k: int) -> dict:
    """case: a confidence (the random stop head decides), a FORCED_TAU string (each request
    draws its own segment lengths: rows differ, as a trained model's do) or None (the base)."""
    forced = float(case.split()[-1]) if isinstance(case, str) else None
    conf = case if isinstance(case, float) else 1.0

    def seqs(n):
        out = [Sequence(p, n, conf, ignore_eos=True) for p in prompts]
        if forced:
            for i, s in enumerate(out):
                s.forced_lens = forced_lengths(forced, k, seed=i)
        return out

    decode_all(batch, seqs(4)[:c], c)  # warm-up (graphs captured at construction)
    todo = seqs(max_new)
    sync(device)
    t0 = time.perf_counter()
    decode_all(batch, todo, c)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in todo)
    return {
        "confidence": case,
        "requests": len(todo),
        "tokens_per_s": tokens / seconds,
        "tokens_per_macro_step": tokens / sum(s.macro_steps for s in todo),
        "seconds": seconds,
    }
