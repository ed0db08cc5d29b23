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
from hamburger.decode.slots import SlotBatch
from hamburger.decode.timing import sync


def section_serve(args, device, shape: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_hamburger(shape, device, dtype)
    rng = random.Random(0)
    vocab = model.base.config.vocab_size
    fast = "graphed" if device.type == "cuda" else "static"
    rows, errors = [], []
    for c in args.serve_concurrency:
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(2 * c)]
        for kind, confs in (("hamburger", (0.3, 0.9)), ("base", (None,))):
            for decode in (fast, "eager"):
                try:
                    batch = make_batch(model, kind, decode, c, args)
                    for conf in confs:
                        rows.append(
                            run(batch, prompts, c, conf, args.max_new, device)
                            | {
                                "model": shape,
                                "server": kind,
                                "decode": decode,
                                "concurrency": c,
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


def make_batch(model, kind: str, decode: str, slots: int, args):
    lm = model if kind == "hamburger" else model.base
    if decode == "eager":
        stepper = HAMburgerStepper(lm) if kind == "hamburger" else BaseStepper(lm)
        return ContinuousBatch(stepper, set(), 0, next(lm.parameters()).device)
    return SlotBatch(lm, slots, args.prompt_len, args.max_new, set(), graphs=decode == "graphed")


def run(batch, prompts, c: int, conf, max_new: int, device) -> dict:
    def seqs(n):
        return [Sequence(p, n, conf if conf is not None else 1.0, ignore_eos=True) for p in prompts]

    decode_all(batch, seqs(4)[:c], c)  # warm-up (graphs captured at construction)
    todo = seqs(max_new)
    sync(device)
    t0 = time.perf_counter()
    decode_all(batch, todo, c)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in todo)
    return {
        "confidence": conf,
        "requests": len(todo),
        "tokens_per_s": tokens / seconds,
        "tokens_per_macro_step": tokens / sum(s.macro_steps for s in todo),
        "seconds": seconds,
    }
