"""The server under load with forced row-varying segment lengths: HAMburger vs its base (CPU).

    python bench/bench_serve_forced.py [--taus 1.5,2,2.5] [--concurrency 1,8,16] [--requests 16]

The served model is SmolLM2-135M-Instruct with freshly initialised HAMburger modules (built by
bench_serve.py). Its stop head is not asked: every HAMburger server runs with `--forced-tau`
(the benchmark switch: each request draws its own segment lengths, mean tau over 1..K, seeded
by its prompt), so the rows of a batch end their segments at different micro steps, as a
trained model's do, and the text means nothing. One server per tau with the batch-aware micro
loop off and one with it on (`--batch-aware`), and the base server, all `--decode eager` (what
`serve` runs on CPU), all up at once; each concurrency level runs on every server in turn,
--repeats passes in alternating order, best pass kept. Every request decodes exactly
--max-tokens (ignore_eos).

m (micro calls per macro step) is read from each server's /metrics. The bound beside each row
is tau * t_base / (t_macro + m * t_micro), with the step costs measured in this process after
the servers stop, at the row's concurrency (t_macro: HAMburger's base step with the embedder
and the base head; t_micro: one micro step over all the rows; the eager batch steps only the
rows still going, so past concurrency 1 this bound is a floor, not a ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Server, ask_ours, bench_prompts, build_models, run_load  # noqa: E402
from report import write_section  # noqa: E402

SECTION = "Serving: forced row-varying segment lengths, HAMburger vs base (CPU)"


def counters(url: str) -> tuple[float, float]:
    """(batch macro steps, batch micro calls) from a server's /metrics."""
    values = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("hamburger_batch_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values["hamburger_batch_macro_steps_total"], values["hamburger_batch_micro_calls_total"]


def step_costs(folders: dict[str, Path], batch: int, n: int = 8) -> dict[str, float]:
    """Seconds per call, at `batch` rows of 32-token prompts: the base's step, HAMburger's macro
    step (embedder + base + base head) and one micro step over every row."""
    import torch
    from transformers import DynamicCache

    from hamburger.decode.continuous import left_pad
    from trainer.serve.loader import load_for_serving

    torch.set_num_threads(1)
    ham = load_for_serving(str(folders["ham"])).stepper
    base = load_for_serving(str(folders["base"])).stepper
    prompts = [[100 + i + j for j in range(32)] for i in range(batch)]
    ids, mask, pos = left_pad(prompts, 0, "cpu")
    costs = {}
    with torch.no_grad():
        for name, stepper, seg in (("t_base", base, [7]), ("t_macro", ham, [7, 8])):
            cache = stepper.new_cache()
            state = stepper.prefill(ids, mask, pos, cache)
            m, p = mask, pos[:, -1:]

            def step(state=state, stepper=stepper, cache=cache, seg=seg):
                nonlocal m, p
                stepper.segments(state, [1] * batch, [1.0] * batch, set())
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
                p = p + len(seg)
                stepper.advance([seg] * batch, m, p, cache)
                cache.crop(-1)  # the same cache width at every call
                m = m[:, :-1]

            costs[name] = timed(step, n)
        model = ham.model
        feats = torch.randn(batch, len(model.feature_layers), model.base.config.hidden_size)
        cache = DynamicCache(config=model.micro.config)
        model.micro_step(torch.cat([model.micro.features_in(feats), feats[:, -1:]], dim=1), cache)
        one = feats[:, -1:]

        def micro():
            model.micro_step(one, cache)
            cache.crop(-1)

        costs["t_micro"] = timed(micro, n)
    return costs


def timed(fn, n: int, reps: int = 3) -> float:
    """The best of `reps` means over n calls (after one warm-up call): the machine is shared."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taus", default="1.5,2,2.5")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_serve_forced-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    folders = build_models(work, 30)
    prompts = bench_prompts(args.requests)
    taus = [float(t) for t in args.taus.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    cases = [("base", None, False)] + [("hamburger", t, aware) for t in taus for aware in (False, True)]
    servers: dict[tuple, Server] = {}
    rows = []
    try:
        for kind, tau, aware in cases:
            extra = (("--forced-tau", str(tau)) if tau else ()) + (("--batch-aware",) if aware else ())
            log = work / f"{kind}-{tau}-{aware}.log"
            servers[(kind, tau, aware)] = srv = Server(
                kind, folders["ham" if kind == "hamburger" else "base"], log, decode="eager", extra=extra
            )
            ask_ours(srv.url, prompts[0], 4, None)  # warm-up
        for c in levels:
            best: dict[tuple, dict] = {}
            for rep in range(args.repeats):
                for case in cases if rep % 2 == 0 else cases[::-1]:
                    url = servers[case].url
                    before = counters(url)
                    res = run_load(ask_ours, url, prompts, c, args.max_tokens, None)
                    after = counters(url)
                    res["m"] = (after[1] - before[1]) / max(after[0] - before[0], 1)
                    row = {"server": case[0], "tau": case[1], "batch_aware": case[2], "concurrency": c, **res}
                    print(json.dumps({k: v for k, v in row.items() if k != "errors"}), flush=True)
                    if case not in best or res["tokens_per_s"] > best[case]["tokens_per_s"]:
                        best[case] = row
            rows += [best[case] for case in cases]
    finally:
        for s in servers.values():
            s.stop()
    costs = {c: step_costs(folders, c) for c in levels}
    print(json.dumps(costs), flush=True)
    body = report(rows, costs, args, (load_start, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


def report(rows: list[dict], costs: dict[int, dict], args, load: tuple[float, float]) -> str:
    base = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["server"] == "base"}
    lines = [
        f"SmolLM2-135M-Instruct (30 layers) + untrained HAMburger modules (K=4, 4 micro layers), fp32, "
        f"`serve --decode eager --max-batch 16`, 1 torch thread per server, on loopback. {args.requests} "
        f"requests per row (chatterbot questions through the chat template, streamed), {args.max_tokens} new "
        f"tokens each; best of {args.repeats} passes. HAMburger servers run `--forced-tau TAU` (each request "
        "draws its own segment lengths, mean tau over 1..4: rows differ), with the batch-aware micro loop off "
        "and on. tau as run: tokens per macro step of the responses; m: micro calls per batch macro step "
        "(/metrics).",
        "",
        "| server | forced tau | batch-aware | concurrency | ok / failed | tokens/s | p50 s | p99 s "
        "| tau as run | m | vs base | bound | vs bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, ham = r["concurrency"], r["server"] == "hamburger"
        k = costs[c]
        bound = (
            r["tokens_per_macro_step"] * k["t_base"] / (k["t_macro"] + r["m"] * k["t_micro"]) if ham else None
        )
        vs = r["tokens_per_s"] / base[c] if c in base else float("nan")
        lines.append(
            f"| {r['server']} | {r['tau'] or ''} | {'on' if r['batch_aware'] else ('off' if ham else '')} | {c} | "
            f"{r['requests'] - r['failed']} / {r['failed']} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} | "
            f"{r['p99']:.2f} | {r['tokens_per_macro_step']:.2f} | {r['m']:.2f} | {vs:.2f}x | "
            f"{f'{bound:.2f}x' if bound else ''} | {f'{vs / bound:.2f}' if bound else ''} |"
        )
    lines += [
        "",
        "Step costs measured in-process after the servers stopped (ms per call): "
        + "; ".join(
            f"concurrency {c}: t_base {k['t_base'] * 1e3:.0f}, t_macro {k['t_macro'] * 1e3:.0f}, "
            f"t_micro {k['t_micro'] * 1e3:.0f}"
            for c, k in costs.items()
        )
        + f". Load average of the shared 2-core machine: {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
