"""The proof recipe's ablation: which settings make the grafted modules learn fastest
on CPU, each trained by the real trainer (2 ranks, `./launch.sh train`) for the same number of
steps on the same self-distilled data, then decoded against the base by the eval stage.

Columns: wall time of the whole training command; the held-out metrics of its last evaluation
(expected tokens/step: the tokens a macro step would emit under the model's own stop head on
the labelled segments; slot-2 accuracy: the micro decoder's first token; CE); and from a short
`./launch.sh eval` at one confidence: tokens per macro step and agreement_prefix with the base's
greedy output.

    python bench/bench_recipe.py [--steps 24] [--runs paper,base_top,...] [--eval-prompts 8]
        [--confidences 0.5,0.8,0.95]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/train_distill.yaml"
RUNS: dict[str, tuple[str, list[str]]] = {
    "paper": ("the paper's choices: micro decoder random, joint fine-tune, ZeRO-3", []),
    "base_top": ("micro decoder = the base's top 4 layers", ["model.hamburger.micro_init=base_top"]),
    "base_top+lr_new_2e-3": (
        "base_top, new modules at lr 2e-3 (4x)",
        ["model.hamburger.micro_init=base_top", "optim.lr_new=2e-3"],
    ),
    "base_top+base_frozen": (
        "base_top, base not updated (lr_base 0)",
        ["model.hamburger.micro_init=base_top", "optim.lr_base=0"],
    ),
    "paper+kl": (
        "paper + KL to the frozen base (kl_weight 1.0): keep the base on its own path",
        ["model.hamburger.kl_weight=1.0"],
    ),
    "base_top+lora": (
        "base_top, base frozen with LoRA adapters (rank 16, lr 5e-4) on its linear layers",
        ["model.hamburger.micro_init=base_top", "model.base_training=lora", "optim.lr_base=5e-4"],
    ),
    "base_top+frozen+align": (
        "base_top, base frozen, feature alignment (align_weight 1.0): the embedder's direct target",
        [
            "model.hamburger.micro_init=base_top",
            "model.base_training=frozen",
            "model.hamburger.align_weight=1.0",
        ],
    ),
    "base_top+lora+align": (
        "base_top, LoRA base (lr 5e-4) + feature alignment (align_weight 1.0)",
        [
            "model.hamburger.micro_init=base_top",
            "model.base_training=lora",
            "optim.lr_base=5e-4",
            "model.hamburger.align_weight=1.0",
        ],
    ),
    "staged": (
        "configs/train_staged.yaml's phases: 12 steps base frozen + alignment, 12 steps LoRA + KL 0.5",
        [
            "model.hamburger.micro_init=base_top",
            "phases=[{name: align, steps: 12, overrides: [model.base_training=frozen, "
            "model.hamburger.align_weight=1.0]}, {name: joint, steps: 12, overrides: [model.base_training=lora, "
            "optim.lr_base=5e-4, model.hamburger.kl_weight=0.5]}]",
        ],
    ),
    "base_top+zero2": (
        "base_top under ZeRO-2 (no parameter gathers)",
        ["model.hamburger.micro_init=base_top", "ds_config=ds_configs/zero2_cpu.json"],
    ),
}


def train(name: str, overrides: list[str], steps: int, out: Path, extra: list[str]) -> float:
    """Runs one training to completion; returns its wall seconds (reused if already finished)."""
    wall_file = out / "wall_seconds.json"
    if (result_dir(out) / "final_metrics.json").exists() and wall_file.exists():
        return json.loads(wall_file.read_text())["seconds"]
    cmd = ["./launch.sh", "train", CONFIG, "--nprocs", "2", f"output_dir={out}", "resume=none"]
    cmd += [f"max_steps={steps}", f"eval_every={steps // 2}", f"save_every={steps}", *extra, *overrides]
    t0 = time.perf_counter()
    log = out.parent / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - t0
    wall_file.write_text(json.dumps({"seconds": seconds}))
    return seconds


def result_dir(run: Path) -> Path:
    """Where a run's final model and metrics are: a staged run's last phase, else the run."""
    phases = sorted(run.glob("phase*-*"))
    return phases[-1] if phases else run


def quick_eval(run: Path, prompts: int, confidences: list[float]) -> dict[float, dict]:
    """The run's speed/quality curve at batch 1: per confidence, the HAMburger row of the eval
    report (tokens per macro step, agreement_prefix, base_nll, speedup against the base)."""
    out = run / "quick_eval"
    wanted = ",".join(str(c) for c in confidences)
    if not (out / "eval.json").exists() or (out / "confidences.txt").read_text() != wanted:
        cmd = ["./launch.sh", "eval", str(run), f"max_prompts={prompts}", "max_new_tokens=48"]
        cmd += ["batch_sizes=[1]", f"confidences=[{wanted}]", "mlflow.enabled=false", f"output_dir={out}"]
        with (run.parent / f"{run.name}.eval.log").open("w") as f:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
        (out / "confidences.txt").write_text(wanted)
    report = json.loads((out / "eval.json").read_text())
    return {r["confidence"]: r for r in report["runs"] if r["decoder"] == "hamburger"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--confidences", default="0.5,0.8,0.95", help="the curve's points")
    ap.add_argument("--out", default="outputs/recipe_ablation")
    ap.add_argument(
        "--data",
        default="",
        help="a prep override, e.g. output_root=outputs/distill (the runs in docs/BENCHMARKS.md used the "
        "generating prep's folder: the same tokens and held-out rows as the shipped corpus)",
    )
    ap.add_argument("--note", default="", help="a sentence about the runs (e.g. what else used the CPU)")
    args = ap.parse_args()
    extra = [f"data.prep_overrides=[{args.data}]"] if args.data else []
    confidences = [float(c) for c in args.confidences.split(",")]
    rows, curve = [], []
    for name in args.runs.split(","):
        what, overrides = RUNS[name]
        run = ROOT / args.out / name
        print(f"[recipe] {name}: {what}", flush=True)
        try:
            seconds = train(name, overrides, args.steps, run, extra)
        except subprocess.CalledProcessError as exc:
            rows.append(f"| {name} | {what} | training failed: {exc} | | | | | | |")
            continue
        m = json.loads((result_dir(run) / "final_metrics.json").read_text())
        try:
            ev = quick_eval(result_dir(run), args.eval_prompts, confidences)
        except subprocess.CalledProcessError:
            ev = {}
            curve.append(f"| {name} | eval failed: {run.parent / f'{run.name}.eval.log'} | | | | |")
        for c, r in sorted(ev.items()):
            curve.append(
                f"| {name} | {c} | {r['tokens_per_macro_step']:.3f} | {r['agreement_prefix']:.3f} "
                f"| {r.get('base_nll', float('nan')):.3f} | {r['speedup']:.2f} |"
            )
        rows.append(
            f"| {name} | {what} | {seconds / 60:.1f} | {m.get('eval/expected_tokens_per_step', float('nan')):.3f} "
            f"| {m.get('eval/token_acc_slot2', float('nan')):.3f} | {m.get('eval/ce', float('nan')):.3f} "
            f"| {m.get('curves/expected_tokens_per_step_slope_per_100_steps', float('nan')):+.2f} |"
        )
        print(rows[-1], *curve[-len(ev) or -1 :], sep="\n", flush=True)
    body = (
        f"SmolLM2-135M-Instruct + HAMburger (K=4, 4 micro layers), `{CONFIG}` on the self-distilled corpus, "
        f"{args.steps} steps each (2 CPU ranks, 1024 tokens per rank per step), same seed and data order. "
        f"Held-out metrics from the last in-training evaluation; the curve from `./launch.sh eval` on "
        f"{args.eval_prompts} held-out prompts, 48 new tokens, batch 1, at each confidence c (base_nll: the "
        "base's own NLL of the run's outputs, nats/token; speed-up: HAMburger tokens/s over the base's, "
        "CPU).\n\n"
        "| run | what | train min | eval expected tok/step | eval slot-2 acc | eval CE "
        "| end slope (tok/step per 100 steps) |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n| run | c | tok/macro step | agreement_prefix | base_nll | speed-up |\n|---|---|---|---|---|---|\n"
        + "\n".join(curve)
        + (f"\n\n{args.note}" if args.note else "")
    )
    write_section("Proof recipe: ablation (CPU)", body)


if __name__ == "__main__":
    main()
