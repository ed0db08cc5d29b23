"""Static-shape decoding vs eager decoding on CPU at batch 1 (the same tokens, checked here).

Random-weight models, fp32, one thread: the SmolLM2-135M shape (30 layers, hidden 576, vocab
49152; compute-bound on CPU) and a tiny one (4 layers, hidden 64; overhead-bound). Two
confidences: 0.9 (the untrained stop head gives P(continue) ~ 0.5, so every segment is one
token: base-like steps) and 0.3 (every segment K = 4 tokens: three micro steps per macro step).
On CPU "graphed" is the static path itself (CUDA graphs need a GPU); bench/gpu_check.sh
measures graphs on a GPU.

    python bench/bench_static_decode.py [--max-new 64] [--reps 3] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_models import random_hamburger  # noqa: E402
from report import write_section  # noqa: E402

from hamburger.decode import base_generate_batch, generate_batch  # noqa: E402

NOTE = (
    "On CPU the 135M shape is compute-bound (both decoders run the same matmuls), so static equals eager "
    "within the noise of a shared machine; at the tiny shape, where Python and dispatch overhead dominate"
    ", static is about 5% faster. What the static path is for, CUDA graphs removing launch overhead, need"
    "s a GPU: `bench/gpu_check.sh`."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="smollm2-135m,tiny")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"Random-weight models, fp32, 1 thread, batch 1, {args.prompt_len}-token prompt, "
        f"{args.max_new} new tokens; best of {args.reps} interleaved runs after a warm-up. The machine is shared "
        "(other jobs take cores at random), so the ratio is also given in tokens per CPU-second of this "
        "process, which waiting for a core does not count. "
        "static = static KV caches, device-side bookkeeping (graphed is the same on CPU).",
        "",
        "| shape | decoder | tokens per macro step | eager tokens/s | static tokens/s | static / eager "
        "| static / eager, tokens per CPU-second | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes.split(","):
        lines += bench_shape(shape, args)
    lines += ["", NOTE]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Static vs eager decoding on CPU (batch 1)", body)


def bench_shape(shape: str, args) -> list[str]:
    model = random_hamburger(shape, torch.device("cpu"), torch.float32)
    vocab = model.base.config.vocab_size
    prompt = [[(7 * i) % (vocab - 3) + 3 for i in range(args.prompt_len)]]
    runs = {
        "base": lambda mode: base_generate_batch(model.base, prompt, args.max_new, decode=mode),
        "hamburger c=0.9": lambda mode: generate_batch(model, prompt, args.max_new, 0.9, decode=mode),
        "hamburger c=0.3": lambda mode: generate_batch(model, prompt, args.max_new, 0.3, decode=mode),
    }
    lines = []
    for name, run in runs.items():
        wall: dict[str, list[float]] = {"eager": [], "static": []}
        cpu: dict[str, list[float]] = {"eager": [], "static": []}
        out = {mode: run(mode) for mode in wall}  # warm-up (and the static decoder is built)
        for _ in range(args.reps):
            for mode in wall:
                t0, c0 = time.perf_counter(), time.process_time()
                run(mode)
                wall[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
        tps = {mode: args.max_new / min(ts) for mode, ts in wall.items()}
        per_cpu_s = {mode: args.max_new / min(ts) for mode, ts in cpu.items()}
        same = out["eager"][0].tokens == out["static"][0].tokens
        per_step = len(out["eager"][0].tokens) / len(out["eager"][0].seg_lens)
        lines.append(
            f"| {shape} | {name} | {per_step:.2f} | {tps['eager']:.1f} | {tps['static']:.1f} | "
            f"{tps['static'] / tps['eager']:.2f}x | {per_cpu_s['static'] / per_cpu_s['eager']:.2f}x | {same} |"
        )
    return lines


if __name__ == "__main__":
    main()
