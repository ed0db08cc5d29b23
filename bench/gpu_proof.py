"""The GPU proof run: does a HAMburger model trained here decode faster at its base's
quality? One call on one GPU, through the project's own commands (`python -m ...`, one process:
no launcher), on SmolLM2-135M-Instruct:

1. prep: the base writes its own greedy responses to the builtin prompts (self-distillation,
   configs/prep_distill.yaml) and labels them with its entropies;
2. train: the staged recipe (configs/train_staged.yaml: base frozen + feature alignment, then LoRA
   + KL to the frozen base), ZeRO-3, bf16, MLflow off (it is not on the GPU machine);
3. export: the adapter folder (the grafted modules + LoRA pairs, files of at most 16 MiB, so
   they come back from the GPU machine);
4. eval: against the base on held-out prompts at batch 1, 8 and 32 with graphed decoding, at
   c in {0.5 .. 0.95}: tokens per macro step, agreement with the base's greedy output, the
   base's NLL of each output, pass@1, tokens/s;
5. writes $OUT/gpu_proof.json + gpu_proof.md (the goals met or not), the eval report, the
   learning curves and the trained adapter folder ($OUT/model/).

    bash bench/gpu_proof.sh [--steps 300] [--chat-weight 0.1] [--eval-prompts 32]
    PYTHON=.venv/bin/python bash bench/gpu_proof.sh --tiny   # the CI dry run: a tiny random model on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
MAX_FILE = 16 * 2**20  # what one file may be to come back from the GPU machine


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_proof"))
    ap.add_argument("--work", default="/tmp/hamburger-gpu-proof/work")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on CPU: the CI dry run")
    ap.add_argument(
        "--steps", type=int, default=300, help="training steps, both phases (1/3 align, 2/3 joint)"
    )
    ap.add_argument("--chat-weight", type=float, default=0.1, help="share of the ~2,200 chatterbot prompts")
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="extra training key=value (repeatable)")
    return ap.parse_args(argv)


def commands(args, work: Path, data: Path) -> dict[str, list[str]]:
    """The four stages as the commands a user would type (one process each); data is the
    folder prep writes (known once it has run)."""
    py = [sys.executable, "-m"]
    prep_dir = work / "prep"
    align = max(1, args.steps // 3)
    if args.tiny:
        model = str(work / "tiny-model")
        prep = [f"model={model}", "sources.0.weight=0.005", "sources.1.weight=0.04", "sources.2.weight=0.02"]
        prep += [
            "generate.max_new_tokens=12",
            "generate.batch_size=4",
            "generate.decode=auto",
            "heldout_fraction=0.3",
        ]
        train = [f"model.base={model}", "model.hamburger.micro_layers=1", "model.hamburger.num_features=2"]
        train += ["data.tokens_per_batch=256", "data.row_capacity=256", "eval_max_batches=1"]
        evals = ["max_prompts=3", "batch_sizes=[1,2]", "confidences=[0.5,0.9]", "max_new_tokens=8"]
    else:
        model = "builtin:smollm2"
        prep = [f"sources.0.weight={args.chat_weight}", "generate.batch_size=64", "generate.decode=auto"]
        train = ["data.tokens_per_batch=8192", "data.row_capacity=2048", "eval_max_batches=8"]
        evals = [f"max_prompts={args.eval_prompts}", "batch_sizes=[1,8,32]", "max_new_tokens=128"]
        evals.append("confidences=[" + ",".join(map(str, CONFIDENCES)) + "]")
    train += [
        f"data.path={data}",
        "data.prep_config=''",
        f"output_dir={work / 'run'}",
        "mlflow.enabled=false",
        f"phases.0.steps={align}",
        f"phases.1.steps={args.steps - align}",
        f"eval_every={max(1, args.steps // 3)}",
        f"save_every={args.steps}",
        *args.set,
    ]
    return {
        "prep": py + ["data_prep.run", "configs/prep_distill.yaml", f"output_root={prep_dir}", *prep],
        "train": py + ["trainer.train", "configs/train_staged.yaml", *train],
        "export": py
        + ["trainer.export", str(work / "run" / "phase2-joint"), "--out", str(work / "export"), "--adapter"]
        + ["--overwrite", "--max-shard-size", "50KB" if args.tiny else "15MB"],  # tiny: sharded too
        "eval": py
        + ["trainer.evaluate", str(work / "export"), f"data={data}", "decode=graphed"]
        + [f"output_dir={work / 'eval'}", "mlflow.enabled=false", *evals],
    }


def tiny_model(folder: Path) -> None:
    """A tiny random Llama with SmolLM2's tokenizer (and chat template): the dry run's base."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hamburger.assets import smollm2_tokenizer_dir

    if (folder / "config.json").is_file():
        return
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def blocked_modules(work: Path) -> Path:
    """A folder that makes `import mlflow` and `import datasets` fail, put first on PYTHONPATH:
    the GPU machine has neither, so the dry run on CPU must not need them either."""
    folder = work / "not-on-the-gpu-machine"
    for name in ("mlflow", "datasets"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine (bench/gpu_proof.py)')\n"
        )
    return folder


def run_stage(name: str, cmd: list[str], env: dict, logs: Path) -> float:
    print(f"[gpu_proof] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with (logs / f"{name}.log").open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (logs / f"{name}.log").read_text()[-4000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}) after {seconds:.0f} s:\n{tail}")
    print(f"[gpu_proof] {name} done in {seconds:.0f} s", flush=True)
    return seconds


def prep_folder(prep_root: Path) -> Path:
    """The one keyed folder prep wrote under output_root."""
    found = sorted(p.parent for p in prep_root.glob("*/manifest.json"))
    if len(found) != 1:
        raise RuntimeError(f"{prep_root}: expected one prep folder, found {[str(p) for p in found]}")
    return found[0]


def goals(report: dict) -> list[str]:
    """The proof run's GPU goals, each with the measured numbers and met / not met."""
    met = {True: "met", False: "not met"}
    ham = [r for r in report["runs"] if r["decoder"] == "hamburger"]
    base = {r["batch_size"]: r for r in report["runs"] if r["decoder"] == "base"}
    out = []
    one = sorted((r for r in ham if r["batch_size"] == 1), key=lambda r: r["confidence"])
    good = [
        r
        for r in one
        if r["agreement_prefix"] >= 0.85
        or (
            r["base_nll"] <= 1.1 * base[1]["base_nll"]
            and r.get("pass_at_1") is not None
            and r["pass_at_1"] >= (base[1].get("pass_at_1") or 0) - 0.02
        )
    ]
    if good:
        r = max(good, key=lambda r: r["tokens_per_macro_step"])
        ok = r["tokens_per_macro_step"] >= 1.7 and r["speedup"] >= 1.4
        out.append(
            f"- at base quality (c={r['confidence']}: agreement_prefix {r['agreement_prefix']:.2f}, base NLL "
            f"{r['base_nll']:.2f} vs the base's {base[1]['base_nll']:.2f}): tau {r['tokens_per_macro_step']:.2f} "
            f"(goal >= 1.7), graphed batch-1 speed-up {r['speedup']:.2f}x (goal >= 1.4): {met[ok]}"
        )
    else:
        best = max(one, key=lambda r: r["agreement_prefix"]) if one else None
        out.append(
            "- no confidence reaches base quality at batch 1"
            + (
                f" (best agreement_prefix {best['agreement_prefix']:.2f} at c={best['confidence']})"
                if best
                else ""
            )
            + ": not met"
        )
    low = next((r for r in one if r["confidence"] == 0.5), None)
    if low is not None:
        out.append(
            f"- c=0.5: tau {low['tokens_per_macro_step']:.2f} (goal >= 2): {met[low['tokens_per_macro_step'] >= 2]}"
        )
    return out


def table(report: dict) -> str:
    cols = ["batch_size", "confidence", "tokens_per_macro_step", "tokens_per_s", "speedup", "bound"]
    cols += ["agreement_prefix", "base_nll", "pass_at_1"]
    rows = ["| decoder | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in report["runs"]:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        rows.append(f"| {r['decoder']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def collect(work: Path, out: Path, result: dict) -> None:
    """What comes back: the report, the eval, the curves and the trained adapter folder."""
    model = out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(work / "export", model)
    too_big = [p.name for p in model.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE]
    if too_big:
        result["errors"].append(f"files over 16 MiB would not come back: {too_big}")
    shutil.copy(work / "eval" / "eval.json", out / "eval.json")
    for png in (work / "eval").glob("*.png"):
        shutil.copy(png, out / png.name)
    for phase in sorted((work / "run").glob("phase*")):
        for name in ("metrics.jsonl", "learning_curves.png"):
            if (phase / name).is_file():
                shutil.copy(phase / name, out / f"{phase.name}-{name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(blocked_modules(work)), str(ROOT), *filter(None, [env.get("PYTHONPATH", "")])]
    )
    if args.tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        sys.path.insert(0, str(ROOT))
        tiny_model(work / "tiny-model")
    result: dict = {"tiny": args.tiny, "steps": args.steps, "seconds": {}, "errors": []}
    t_start = time.perf_counter()
    try:
        result["seconds"]["prep"] = run_stage("prep", commands(args, work, Path())["prep"], env, out / "logs")
        data = prep_folder(work / "prep")
        cmds = commands(args, work, data)
        result["manifest"] = {
            k: v
            for k, v in json.loads((data / "manifest.json").read_text()).items()
            if k in ("rows_out", "compression", "response_tokens", "segment_histogram")
        }
        for stage in ("train", "export", "eval"):
            result["seconds"][stage] = run_stage(stage, cmds[stage], env, out / "logs")
        report = json.loads((work / "eval" / "eval.json").read_text())
        result["goals"] = goals(report)
        result["table"] = table(report)
        collect(work, out, result)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        result["errors"].append(str(e))
    result["seconds"]["total"] = time.perf_counter() - t_start
    (out / "gpu_proof.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# GPU proof run ({'tiny dry run' if args.tiny else 'SmolLM2-135M-Instruct'}, {args.steps} steps)",
        "",
    ]
    md += [f"- {k}: {v:.0f} s" for k, v in result["seconds"].items()]
    md += ["", *result.get("goals", []), "", result.get("table", ""), ""]
    md += [f"**error:** {e}" for e in result["errors"]]
    (out / "gpu_proof.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
