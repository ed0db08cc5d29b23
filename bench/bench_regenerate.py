"""Self-distillation's decoding speed: the continuous batch against the fixed batches it replaced.

The embedded SmolLM2-135M-Instruct writes responses to the prompts of the shipped self-distilled
corpus (the builtin chatterbot / humaneval / stdlib prompts), as `responses: regenerate` does,
at one batch size, three ways in one run, interleaved and repeated (the machine is noisy):
- `fixed` (before): sorted prompts in fixed batches of `batch_size` through base_generate_batch's
  loop on transformers' DynamicCache; a batch runs at the pace of its longest response while
  finished rows retire;
- `continuous` (now, eager): data_prep's Regenerator called shard by shard as prep calls it, one
  continuous batch on GrowingCache (appends in place): a row that ends makes room for the next
  prompt at once, the next shard's included;
- `static` (optional): the Regenerator on the slot engine (`generate.decode=static`, graphed on
  a GPU).
Greedy tokens must be the same every way (checked); tokens/s is response tokens over wall time.
Sampled decoding (temperature 0.7, top-p 0.95) is timed through the Regenerator too.

    python bench/bench_regenerate.py [--prompts 64] [--shard-rows 64] [--batch-size 16]
        [--max-new-tokens 256] [--repeats 2] [--modes fixed,continuous,static]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import write_section  # noqa: E402

from data_prep.config import GenerateConfig  # noqa: E402
from data_prep.distilled_asset import read_asset  # noqa: E402
from data_prep.regenerate import Regenerator  # noqa: E402
from data_prep.sources import Conversation  # noqa: E402
from data_prep.tokenize import ChatTokenizer  # noqa: E402
from hamburger.assets import resolve_model  # noqa: E402
from hamburger.decode.batched import _retiring_loop  # noqa: E402
from hamburger.decode.steppers import BaseStepper  # noqa: E402


def prompts_of_the_corpus(tokenizer, n: int) -> tuple[list[list[int]], str]:
    """n prompts spread over the shipped corpus (every k-th record: all three sources)."""
    header, records = read_asset()
    chat = ChatTokenizer(tokenizer, header["chat_template"])
    picked = records[:: max(1, len(records) // n)][:n]
    convs = [Conversation([{"role": "user", "content": r["prompt"]}], "", "", "", 0) for r in picked]
    mix = {s: sum(r["source"] == s for r in picked) for s in sorted({r["source"] for r in picked})}
    return [chat.prompt(c) for c in convs], ", ".join(f"{s} {k}" for s, k in mix.items())


class DynamicCacheStepper(BaseStepper):
    """The base stepper on transformers' DynamicCache (a torch.cat of the whole cache per step),
    as the batches ran before GrowingCache."""

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)


@torch.no_grad()
def fixed(model, prompts, cfg: GenerateConfig, eos: int, pad: int, shard_rows: int = 64) -> list[list[int]]:
    """The loop self-distillation ran before: shard by shard, sorted prompts in fixed batches of
    batch_size through base_generate_batch's retiring loop (rows retire, none join), on
    DynamicCache."""
    out: list[list[int]] = []
    stepper = DynamicCacheStepper(model)
    for first in range(0, len(prompts), shard_rows):
        shard = prompts[first : first + shard_rows]
        order = sorted(range(len(shard)), key=lambda i: (len(shard[i]), i))
        got: list[list[int]] = [[] for _ in shard]
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = [shard[i] for i in idx]
            results = _retiring_loop(stepper, batch, cfg.max_new_tokens, [1.0] * len(idx), {eos}, pad)
            for i, r in zip(idx, results, strict=True):
                got[i] = r.tokens
        out += got
    return out


SHARD_ROWS = 64  # as configs/prep_distill.yaml


def through_regenerator(
    model, prompts, cfg: GenerateConfig, eos: int, pad: int, shard_rows: int = SHARD_ROWS
) -> list[list[int]]:
    """As data_prep's shard loop calls it: shard by shard, each with the next shard's prompts."""
    regen = Regenerator(model, cfg, eos, pad)
    shards = [prompts[i : i + shard_rows] for i in range(0, len(prompts), shard_rows)]
    out = []
    for j, shard in enumerate(shards):
        upcoming = (f"bench-{j + 1:05d}", shards[j + 1]) if j + 1 < len(shards) else None
        out += [g.tokens for g in regen.responses(shard, f"bench-{j:05d}", upcoming)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="prompts per shard")
    ap.add_argument("--modes", default="fixed,continuous,static")
    ap.add_argument("--no-sampled", action="store_true", help="skip the sampled row")
    ap.add_argument("--note", default="")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("builtin:smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    prompts, mix = prompts_of_the_corpus(tok, args.prompts)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    greedy = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    runs = {
        "fixed": (fixed, greedy),
        "continuous": (through_regenerator, greedy),
        "static": (through_regenerator, GenerateConfig(**{**vars(greedy), "decode": "static"})),
    }
    modes = [m for m in args.modes.split(",") if m]
    if not args.no_sampled:
        runs["continuous sampled"] = (
            through_regenerator,
            GenerateConfig(**{**vars(greedy), "temperature": 0.7, "top_p": 0.95}),
        )
        modes.append("continuous sampled")
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for mode in modes if rep % 2 == 0 else modes[::-1]:  # interleaved, order reversed each repeat
            fn, cfg = runs[mode]
            t0 = time.perf_counter()
            tokens[mode] = fn(model, prompts, cfg, eos, pad, shard_rows=args.shard_rows)
            seconds[mode].append(time.perf_counter() - t0)
            n = sum(map(len, tokens[mode]))
            print(
                f"[{rep}] {mode}: {n} tokens in {seconds[mode][-1]:.1f} s ({n / seconds[mode][-1]:.1f} tok/s)"
            )
    greedy_modes = [m for m in modes if m != "continuous sampled"]
    same = all(tokens[m] == tokens[greedy_modes[0]] for m in greedy_modes)
    differ = sum(
        a != b for m in greedy_modes for a, b in zip(tokens[m], tokens[greedy_modes[0]], strict=True)
    )
    base_rate = None
    rows = []
    for mode in modes:
        n = sum(map(len, tokens[mode]))
        rate = n / statistics.median(seconds[mode])
        base_rate = base_rate or rate
        cut = sum(len(t) == args.max_new_tokens and t[-1] != eos for t in tokens[mode])
        rows.append(
            f"| {mode} | {n} | {cut} | {statistics.median(seconds[mode]):.1f} "
            f"({', '.join(f'{s:.1f}' for s in seconds[mode])}) | {rate:.1f} | {rate / base_rate:.2f}x |"
        )
    lengths = sorted(map(len, tokens[greedy_modes[0]]))
    body = (
        f"SmolLM2-135M-Instruct ({dtype}, {device}) writes responses to {len(prompts)} prompts of the "
        f"shipped corpus ({mix}), batch size {args.batch_size}, at most {args.max_new_tokens} new "
        f"tokens, {args.shard_rows} prompts per shard (the continuous batch starts the next shard's "
        f"prompts while a shard ends, as prep does); response lengths min {lengths[0]}, median "
        f"{lengths[len(lengths) // 2]}, max {lengths[-1]}. "
        + (
            "Runs interleaved, order reversed each repeat; tokens/s from the median time.\n\n"
            if args.repeats > 1
            else "One run each, in the order of the table.\n\n"
        )
        + "| decoding | response tokens | cut at the limit | seconds (median; each) | tokens/s | vs first row |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + (
            "Greedy tokens: identical in every greedy mode.\n"
            if same
            else f"Greedy tokens: {differ} responses differ between modes (fp near-ties).\n"
        )
        + (f"\n{args.note}\n" if args.note else "")
    )
    print(body)
    if not args.no_write:
        write_section("Self-distillation: continuous batch vs fixed batches", body)


if __name__ == "__main__":
    main()
