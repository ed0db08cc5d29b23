"""Speed of one decoder over the prompts: timed runs, tokens per macro step, the speed bound.

run_decoder times a decode function over all prompts in batches (and its TTFT); speed, m
(micro-decoder calls per macro step) and bound_columns turn those runs and the measured step
costs into the speed columns of eval.json.
"""

from __future__ import annotations

import time

from hamburger.decode.step_costs import micro_calls, speed_bound
from trainer.evaluate.prompts import Prompt


def micro_calls_per_macro_step(results: list, batch_size: int) -> float:
    """m of a run: micro-decoder calls / macro steps over its batches (results in batch order)."""
    calls = steps = 0
    for i in range(0, len(results), batch_size):
        c, s = micro_calls(results[i : i + batch_size])
        calls, steps = calls + c, steps + s
    return calls / steps


def run_decoder(fn, prompts: list[Prompt], batch_size: int, desc: str = "") -> tuple[list, float, float]:
    """(results, seconds, mean TTFT seconds) over all prompts in batches, after a warm-up. A
    progress bar (stderr, one update per batch: microseconds beside a decode) names the run."""
    from tqdm import tqdm

    fn([p.ids for p in prompts[:batch_size]], 2)
    results, t0 = [], time.perf_counter()
    with tqdm(total=len(prompts), desc=f"[eval] {desc}".strip(), unit="prompt", leave=False) as bar:
        for i in range(0, len(prompts), batch_size):
            results += fn([p.ids for p in prompts[i : i + batch_size]], None)
            bar.update(min(batch_size, len(prompts) - i))
    seconds = time.perf_counter() - t0
    ttft = []
    for i in range(0, len(prompts), batch_size):
        t1 = time.perf_counter()
        fn([p.ids for p in prompts[i : i + batch_size]], 1)
        ttft.append(time.perf_counter() - t1)
    return results, seconds, sum(ttft) / len(ttft)


def speed(results, seconds: float, prompts: list[Prompt]) -> dict[str, float]:
    tokens = sum(len(r.tokens) for r in results)
    forwards = sum(r.macro_steps for r in results)
    kv_added = sum(r.kv_entries - len(p.ids) for r, p in zip(results, prompts, strict=True))
    return {
        "generated_tokens": tokens,
        "macro_steps": forwards,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_macro_step": tokens / forwards,
        "kv_entries_per_token": kv_added / max(tokens, 1),
    }


def bound_columns(run: dict, m: float, costs: dict[str, float], base_run: dict) -> dict[str, float]:
    """m, the speed bound of a HAMburger run (see DEFINITIONS) and the measured share of it."""
    tau = run["tokens_per_macro_step"]
    bound = speed_bound(tau, m, costs["t_base_s"], costs["t_embed_s"], costs["t_micro_s"])
    speedup = run["tokens_per_s"] / base_run["tokens_per_s"]
    return {"micro_calls_per_macro_step": m, "bound": bound, "speedup_over_bound": speedup / bound, **costs}
