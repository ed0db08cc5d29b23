"""Memory and step time of a training rank's data as the corpus grows: the on-disk sample
store against every sample as Python lists (what the trainer did before).

Writes synthetic prep folders (the shard schema, prompts of 8-64 and responses of 16-160 tokens,
segments of 1-4) of each --sizes count of samples, once, under --work. Then, in a fresh process
per (mode, size), does what a training rank does with its data: open the train split, build the
epoch's batch plan (`BatchPlan`), and take --steps micro-batches of the plan through the
collate the trainer uses. Reported: the process's peak RSS, its anonymous (private) resident
memory at the end, its file-backed resident memory, and the time to open, to plan, and per micro-batch.

    python bench/bench_train_memory.py [--sizes 10000,100000,1000000] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from report import write_section  # noqa: E402

SHARD_ROWS = 50_000


def make_folder(folder: Path, n: int) -> None:
    """n seeded synthetic samples in shards of SHARD_ROWS rows, with a manifest (once)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.shards import SCHEMA, SCHEMA_VERSION, sha256_file

    if (folder / "manifest.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    infos = []
    for j, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        prompt = rng.integers(8, 65, rows)
        resp = rng.integers(16, 161, rows)
        ids = rng.integers(3, 49152, int((prompt + resp).sum()), dtype=np.int32)
        segs, seg_counts = [], []
        for r in resp.tolist():  # segment lengths 1..4 summing to each response
            s = rng.integers(1, 5, r)
            cut = np.searchsorted(s.cumsum(), r)
            s = s[: cut + 1]
            s[-1] -= s.sum() - r
            segs.append(s)
            seg_counts.append(len(s))
        ids_arr = pa.ListArray.from_arrays(np.r_[0, (prompt + resp).cumsum()].astype(np.int32), ids)
        seg_arr = pa.ListArray.from_arrays(
            np.r_[0, np.cumsum(seg_counts)].astype(np.int32), np.concatenate(segs).astype(np.int8)
        )
        table = pa.table(
            {
                "sample_id": np.arange(start, start + rows),
                "source": ["synthetic"] * rows,
                "origin": [""] * rows,
                "copies": np.ones(rows, np.int16),
                "input_ids": ids_arr,
                "prompt_len": prompt.astype(np.int32),
                "seg_lens": seg_arr,
                "values": pa.array([[]] * rows, pa.list_(pa.float16())),
                "meta": ["{}"] * rows,
            },
            schema=SCHEMA,
        )
        path = folder / f"train-{j:05d}.parquet"
        pq.write_table(table, path)
        infos.append({"file": path.name, "rows": rows, "sha256": sha256_file(path), "stats": {}})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": {"label": {}},
        "splits": {"train": {"shards": infos}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def lists(folder: Path):
    """The trainer's data before the store: every sample as Python lists."""
    from data_prep.shards import read_split
    from hamburger.model import Sample

    table = read_split(folder, "train")
    cols = {n: table.column(n).to_pylist() for n in ("sample_id", "input_ids", "prompt_len", "seg_lens")}
    samples = [
        Sample(input_ids=i, prompt_len=p, seg_lens=s, sample_id=d)
        for d, i, p, s in zip(*cols.values(), strict=True)
    ]
    return samples, [s.macro_len for s in samples]


def rank_main(args) -> None:
    import torch

    from hamburger.model import collate
    from trainer.train.data import BatchPlan
    from trainer.train.sample_store import open_samples

    torch.set_num_threads(1)
    out = {"mode": args.mode, "samples": args.size, "after_imports_mib": status_kib("VmHWM") / 1024}
    t0 = time.perf_counter()
    if args.mode in ("convert", "store"):
        if args.mode == "convert":  # the first rank of the first run: converts the shards
            shutil.rmtree(args.folder / ".store", ignore_errors=True)
        samples = open_samples(args.folder, "train")
        lens = samples.macro_lens
    else:
        samples, lens = lists(args.folder)
    out["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = BatchPlan(lens, tokens_per_batch=2048, world_size=2, grad_accum=1, seed=0)
    batches = plan.rank_batches(0, 0)
    out["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches[: args.steps]:
        collate([samples[i] for i in b], 4, 2048)
    out["step_ms"] = 1000 * (time.perf_counter() - t0) / min(args.steps, len(batches))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["anon_mib"] = status_kib("RssAnon") / 1024
    out["file_mib"] = status_kib("RssFile") / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", default="convert,store,lists")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_train_memory"))
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="store", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        return rank_main(args)
    results = []
    for n in map(int, args.sizes.split(",")):
        folder = args.work / f"prep_{n}"
        make_folder(folder, n)
        for mode in args.modes.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--rank",
                "--mode",
                mode,
                "--size",
                str(n),
                "--folder",
                str(folder),
            ]
            cmd += ["--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{mode} at {n} samples failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    rows = [
        "| data | samples | peak RSS MiB | anon RSS MiB | file RSS MiB | open s | plan s | ms per micro-batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['mode']} | {r['samples']:,} | {r['peak_rss_mib']:.0f} | {r['anon_mib']:.0f} | "
            f"{r['file_mib']:.0f} | {r['open_s']:.1f} | {r['plan_s']:.2f} | {r['step_ms']:.1f} |"
        )
    body = (
        "One training rank's data (open the train split, plan an epoch, collate "
        f"{args.steps} micro-batches of 2048 positions), in a fresh process per row; synthetic "
        "samples of 24-224 tokens (about 128). `convert`: the on-disk sample store, on "
        "its first open (this rank converts the shards; the others wait); `store`: every other "
        "rank and later run (the conversion exists and is read); `lists`: every sample as "
        "Python lists, as the trainer read data before. Anonymous RSS is the rank's own "
        "memory; file RSS is mapped files (the libraries: the store maps nothing)."
        "\n\n" + "\n".join(rows)
    )
    write_section("Training data memory (CPU)", body)


if __name__ == "__main__":
    main()
