"""Peak memory and time of the response-token loss: the whole [T, V] fp32 logits at once vs the
chunked loss (hamburger/model/chunked_loss.py), forward + backward, side by side.

Each mode runs in its own process (peak RSS, ru_maxrss, is per process) on the same inputs: T
response-token hidden states of width D through an LM head of V rows, cross-entropy and the KL
to a frozen teacher head, as HAMburgerModel.forward computes them. The default shape is
SmolLM2-135M's head (D 576, V 49152) at 8192 response tokens; `--vocab 128256 --dim 2048` is
Llama-3.2-1B's.

    python bench/bench_loss_memory.py [--tokens 8192] [--vocab 49152] [--dim 576] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import write_section  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args) -> dict:
    """One mode in this process: inputs first (their memory is the baseline), then the loss."""
    import torch
    import torch.nn.functional as F

    from hamburger.model.chunked_loss import chunked_token_losses

    torch.manual_seed(0)
    head = torch.nn.Linear(args.dim, args.vocab, bias=False)
    teacher = torch.nn.Linear(args.dim, args.vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(args.tokens, args.dim, requires_grad=True)
    t_hidden = torch.randn(args.tokens, args.dim)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    before = peak_mib()
    t0 = time.perf_counter()
    if args.mode == "whole":
        logits = head(hidden).float()
        ce = F.cross_entropy(logits, targets)
        t_logp = F.log_softmax(teacher(t_hidden).float(), dim=-1)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), t_logp, log_target=True, reduction="batchmean")
    else:
        chunks = -(-args.tokens // args.chunk)
        ce, kl, _ = chunked_token_losses(head, hidden, targets, chunks, teacher, t_hidden)
    (ce + 0.3 * kl).backward()
    seconds = time.perf_counter() - t0
    return {
        "mode": args.mode,
        "loss": float(ce + 0.3 * kl),
        "inputs_mib": before,
        "peak_mib": peak_mib(),
        "s": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--chunks-also", type=int, default=1024, help="a second, smaller chunk size")
    ap.add_argument("--mode", default="")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = []
    for mode, chunk in (("whole", 0), ("chunked", args.chunk), ("chunked", args.chunks_also)):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
        ]
        cmd += ["--dim", str(args.dim), "--chunk", str(chunk or 1)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rec = json.loads(out.strip().splitlines()[-1])
        rec["chunk"] = chunk
        rows.append(rec)
        print(rec, flush=True)
    whole = rows[0]
    full_gib = args.tokens * args.vocab * 4 / 2**30
    lines = [
        f"T = {args.tokens} response tokens, LM head {args.vocab} x {args.dim} (fp32), CE + 0.3 KL to a frozen "
        f"teacher head, forward + backward, one process per mode. One [T, V] fp32 tensor is {full_gib:.2f} GiB. "
        "Peak RSS above the inputs (ru_maxrss after the loss minus before it).",
        "",
        "| loss | chunk tokens | peak above inputs | vs whole | time s | loss value |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = r["peak_mib"] - r["inputs_mib"]
        ratio = extra / (whole["peak_mib"] - whole["inputs_mib"])
        chunk = "all" if r["mode"] == "whole" else str(r["chunk"])
        lines.append(
            f"| {r['mode']} | {chunk} | {extra:.0f} MiB | {ratio:.2f}x | {r['s']:.2f} | {r['loss']:.6f} |"
        )
    write_section("Trainer: loss memory, whole logits vs chunked (CPU)", "\n".join(lines))


if __name__ == "__main__":
    main()
