"""`./launch.sh plan`'s estimate against what finished runs measured (CPU ranks).

For each run folder: the plan of the run's own resolved config (OUTPUT_DIR/config.yaml, what the
trainer read), for its world size, against the largest `peak_rss_gib` rank 0 logged in
metrics.jsonl (its peak resident memory). Writes the table to docs/BENCHMARKS.md "plan".

    python bench/bench_plan.py outputs/recipe_ablation/base_top+lora outputs/...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import write_section  # noqa: E402

from hamburger.configio import load_config  # noqa: E402
from trainer.tools.plan import GIB, memory, model_shapes, zero_stage  # noqa: E402
from trainer.train.config import TrainConfig  # noqa: E402


def measured_peak(run: Path) -> float:
    peaks = [
        json.loads(line)["metrics"].get("peak_rss_gib", 0.0)
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return max(peaks, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--world", type=int, default=2, help="the runs' number of ranks")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows = []
    for run in map(Path, args.runs):
        cfg = load_config(TrainConfig, run / "config.yaml")
        s = model_shapes(cfg)
        stage, _ = zero_stage(cfg, s, args.world, None)
        mem = memory(cfg, s, stage, args.world, cfg.data.tokens_per_batch, cpu=True)
        est, peak = sum(mem.values()) / GIB, measured_peak(run)
        biggest = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(mem.items(), key=lambda kv: -kv[1])[:3])
        ratio = f"{est / peak:.2f}" if peak else "no peak_rss_gib logged"
        rows.append(f"| {run.name} | {cfg.base_training} | {est:.2f} | {peak:.2f} | {ratio} | {biggest} |")
        print(rows[-1], flush=True)
    body = (
        f"`./launch.sh plan --cpu --gpus {args.world}` on each run's own config.yaml against rank 0's peak "
        "resident memory (`peak_rss_gib`, the largest logged). CPU ranks, fp32, ZeRO-3.\n\n"
        "| run | base | plan GiB | measured GiB | plan / measured | largest components (GiB) |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + (f"\n\n{args.note}" if args.note else "")
    )
    write_section("plan: estimate against measured peaks (CPU)", body)


if __name__ == "__main__":
    main()
