"""Training throughput through the real engine on CPU: SmolLM2-135M, 1 and 2 ranks under ZeRO-3,
and HAMburger against plain SFT of the same base on the same packed batches.

"Plain SFT" here is the same trainer with K=1 (every segment one token: the embedder passes
tokens through, no micro-decoder compute, the base head predicts every token) on a copy of
the shards whose segments are all set to 1. Needs the demo's prep shards (./launch.sh demo).

    python bench/bench_train.py [--steps 6] [--prep outputs/demo/prep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from data_prep.shards import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def single_token_copy(src: Path, dst: Path) -> Path:
    """The same rows with every segment of length 1 (manifest checksums updated)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = dst / shard["file"]
            table = pq.read_table(path)
            ones = [[1] * sum(s) for s in table.column("seg_lens").to_pylist()]
            table = table.set_column(
                table.schema.get_field_index("seg_lens"), "seg_lens", pa.array(ones, type=pa.list_(pa.int8()))
            )
            pq.write_table(table, path)
            shard["sha256"] = sha256_file(path)
    manifest["key"]["label"]["max_segment_len"] = 1
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def run(data: Path, nprocs: int, steps: int, out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(ROOT / "launch.sh"),
        "train",
        "configs/train_demo.yaml",
        f"output_dir={out}",
        f"data.path={data}",
        f"max_steps={steps}",
        "eval_every=0",
        "save_every=0",
        "mlflow.enabled=false",
        *extra,
        "--nprocs",
        str(nprocs),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(line)["metrics"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]  # the first step warms up
    return statistics.median(r["tokens_per_s"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prep", default="outputs/demo/prep")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    folders = [p.parent for p in Path(args.prep).glob("*/manifest.json")]
    if not folders:
        raise SystemExit(f"no prep output under {args.prep}; run ./launch.sh demo first")
    data = max(folders, key=lambda p: p.stat().st_mtime)
    k1 = single_token_copy(data, Path("outputs/bench_train/k1_data"))
    base = Path("outputs/bench_train")
    res = {
        "HAMburger, 1 rank": run(data, 1, args.steps, base / "h1"),
        "HAMburger, 2 ranks": run(data, 2, args.steps, base / "h2"),
        "plain SFT (K=1), 2 ranks": run(k1, 2, args.steps, base / "s2", "model.hamburger.max_segment_len=1"),
    }
    manifest = json.loads((data / "manifest.json").read_text())
    lines = [
        f"SmolLM2-135M-Instruct, fp32, ZeRO-3 on CPU (gloo, 1 thread per rank), demo data "
        f"(compression {manifest['compression']:.2f} tokens/segment), 1024 macro positions per rank per "
        f"micro-batch, median of steps 2..{args.steps}. tokens/s = all tokens (prompt + response) of all "
        "ranks per second of the step.",
        "",
        "| run | tokens/s | ratio |",
        "|---|---|---|",
    ]
    ref = res["plain SFT (K=1), 2 ranks"]
    for name, v in res.items():
        lines.append(f"| {name} | {v:.0f} | {v / ref:.2f}x vs plain SFT |")
    lines.append("")
    lines.append(
        f"2-rank scaling: {res['HAMburger, 2 ranks'] / res['HAMburger, 1 rank']:.2f}x of 1 rank "
        "(2 cores: one per rank)."
    )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Trainer: training throughput through the engine (CPU)", body)


if __name__ == "__main__":
    main()
