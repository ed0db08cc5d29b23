"""Peak memory per prep rank on a large JSONL source: row locators vs every row in memory.

Generates a 1,000,000-row JSONL file (once), then starts `--world` rank processes that each do
what `prepare()` does on a rank, through the same functions: scan and validate every row
(`index_source`), derive the shared plan (`make_plan`, `shard_work`), then read back the rows of
every shard the rank owns (`SplitPlan.rows`) and label the first `--label-shards` of them with a
tiny random Llama (`label_shard`; labelling a million rows on CPU would take hours, and the
scoring model's memory does not depend on the corpus). `--mode all-rows` instead holds every
row of the source as Python objects on every rank, as prep did before row locators.

    python bench/bench_prep_memory.py [--rows 1000000] [--world 2] [--label-shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import write_section  # noqa: E402

WORDS = "the a of to and in is that it for on with as was by this be are model token data".split()


def generate(path: Path, rows: int) -> None:
    """Q/A rows of 5-25 and 10-60 words, seeded (the same file on every run)."""
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            f.write(json.dumps({"instruction": f"Question {i}: {q}?", "output": a + "."}) + "\n")
    tmp.replace(path)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_main(args) -> None:
    """One rank: the prep code path up to labelling, with its peak RSS at each stage."""
    import torch
    from transformers import AutoTokenizer

    from data_prep.config import PrepConfig, SourceConfig
    from data_prep.label import Scorer
    from data_prep.run import label_shard, make_plan, shard_work
    from data_prep.sources import index_source
    from data_prep.tokenize import ChatTokenizer, special_token_pattern
    from hamburger.assets import smollm2_tokenizer_dir

    torch.set_num_threads(1)
    out: dict = {"rank": args.rank, "mode": args.mode, "after_imports_mib": peak_mib()}
    cfg = PrepConfig(sources=[SourceConfig(path=str(args.data))], shard_rows=256, max_len=256)
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    t0 = time.perf_counter()
    src = index_source(cfg.sources[0], cfg.bad_rows, special_token_pattern(tok))
    held = src.rows if args.mode == "all-rows" else None  # the old design: every row as objects
    plan = make_plan([src], cfg)
    work = shard_work(plan, cfg)
    mine = [w for i, w in enumerate(work) if i % args.world == args.rank]
    out.update(rows=len(src), shards=len(work), my_shards=len(mine), plan_s=time.perf_counter() - t0)
    out["after_plan_mib"] = peak_mib()
    t0 = time.perf_counter()
    read = 0
    for split, start, stop in mine:  # what the labelling loop reads, one shard at a time
        read += len(plan[split].rows([src], start, stop))
    out.update(rows_read_back=read, read_back_s=time.perf_counter() - t0, after_read_back_mib=peak_mib())
    model = _tiny_model(tok)
    scorer = Scorer(model, torch.device("cpu"), pad_id=tok.eos_token_id)
    chat = ChatTokenizer(tok)
    t0 = time.perf_counter()
    for split, start, stop in mine[: args.label_shards]:
        label_shard(plan[split].rows([src], start, stop), start, chat, scorer, cfg)
    out.update(labelled_shards=min(args.label_shards, len(mine)), label_s=time.perf_counter() - t0)
    out["peak_mib"] = peak_mib()
    del held
    print(json.dumps(out), flush=True)


def _tiny_model(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def run_ranks(args, mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--world", str(args.world), "--mode", mode]
            + ["--data", str(args.data), "--label-shards", str(args.label_shards)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for r in range(args.world)
    ]
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a rank failed (exit {p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--label-shards", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="JSONL file (generated if missing)")
    ap.add_argument("--mode", choices=("locators", "all-rows"), default="locators")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    args.data = args.data or Path(f"/tmp/hamburger_bench_prep_{args.rows}.jsonl")
    if not args.data.is_file():
        t0 = time.perf_counter()
        generate(args.data, args.rows)
        print(f"generated {args.data} in {time.perf_counter() - t0:.0f}s")
    size_mib = args.data.stat().st_size / 2**20
    lines = [
        f"{args.rows:,}-row generated JSONL ({size_mib:.0f} MiB), {args.world} ranks as separate processes, "
        "shard_rows 256. Each rank scans and validates every row, builds the shared plan, reads back every "
        f"row of its own shards, and labels {args.label_shards} of them (tiny random Llama, SmolLM2 tokenizer). "
        "Peak RSS (ru_maxrss) per rank, after each stage; `all-rows` = every rank holds every row as "
        "Python objects (prep before row locators).",
        "",
        "| design | rank | rows read back | peak after imports | after plan | after read-back | peak | plan s | read-back s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    source_side = {}
    for mode in ("all-rows", "locators"):
        results = run_ranks(args, mode)
        source_side[mode] = max(r["after_plan_mib"] - r["after_imports_mib"] for r in results)
        for r in results:
            lines.append(
                f"| {mode} | {r['rank']} | {r['rows_read_back']:,} | {r['after_imports_mib']:.0f} MiB | "
                f"{r['after_plan_mib']:.0f} MiB | {r['after_read_back_mib']:.0f} MiB | **{r['peak_mib']:.0f} MiB** | "
                f"{r['plan_s']:.1f} | {r['read_back_s']:.1f} |"
            )
    lines += [
        "",
        f"Source side (after plan minus after imports, worst rank): all-rows {source_side['all-rows']:.0f} MiB, "
        f"locators {source_side['locators']:.0f} MiB. Goal: at most 2 GiB per rank at "
        "1,000,000 rows, 2 ranks.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("data_prep: memory per rank at corpus scale", body)


if __name__ == "__main__":
    main()
