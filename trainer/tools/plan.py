"""`./launch.sh plan CONFIG [--gpus N] [--nodes M] [--gpu-mem GIB] [--mfu F] [key=value ...]`

Before anything is launched: the memory one GPU needs for this training config (parameters,
gradients and optimiser state under its ZeRO stage, the frozen teacher, ZeRO-3's gathered
working set, activations, the loss chunk), the tokens one optimiser step takes, and the step
time the FLOPs imply at a stated MFU. A config that cannot fit is refused, naming what to
change (the largest data.tokens_per_batch that fits, among others). It reads the config the
trainer reads and builds the model on the meta device: nothing is loaded, no GPU is needed.

The estimates are first-order (counted tensors, not measured allocator behaviour); docs/
BENCHMARKS.md "plan" compares them with measured peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks
GPU_MEM_GIB = {"h100": 79.6, "h200": 139.8, "a100": 79.2}  # what torch reports as total memory
RUNTIME_CPU = 0.38 * GIB
"""A CPU rank's resident memory after importing torch, transformers, deepspeed and mlflow
(measured here); on a GPU the libraries live in host memory, not the device's."""
STEP_TEMPORARIES_CPU = 0.43
"""On a CPU rank a step's peak exceeds its counted tensors (activations, hidden states, micro
decoder, loss chunk) by this share: autograd's temporaries and what glibc's allocator keeps.
Measured (docs/BENCHMARKS.md "plan"): the static part (runtime, parameters, gradients, optimiser)
matched within 10% after deepspeed.initialize, the step's part came out 1.35-1.51x its count on
two configs (full base at 1024 tokens, frozen base at 2048). GPU ranks have no such term until
the GPU check measures one."""
FIT_SHARE = 0.9
"""A config fits when its estimate is at most this share of the GPU (allocator fragmentation,
CUDA context and NCCL buffers take the rest)."""


@dataclass
class Shapes:
    """What the estimate needs to know about the model, counted on the meta device."""

    base: int  # base parameters
    new: int  # grafted modules (embedder, micro decoder, stop head)
    lora: int  # LoRA adapter parameters (0 unless base_training lora)
    micro: int  # the micro decoder's layers alone
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int
    vocab: int


def model_shapes(cfg) -> Shapes:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hamburger.assets import resolve_model
    from hamburger.model import HAMburgerModel
    from hamburger.model.lora import add_lora

    bcfg = AutoConfig.from_pretrained(resolve_model(cfg.model.base))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(bcfg)
        hcfg = type(cfg.model.hamburger)(**{**cfg.model.hamburger.to_dict(), "kl_weight": 0.0})
        model = HAMburgerModel(base, hcfg)
        n_base = sum(p.numel() for p in base.parameters())
        lora = (
            sum(p.numel() for p in add_lora(base, cfg.model.lora)) if cfg.model.base_training == "lora" else 0
        )
    heads = bcfg.num_attention_heads
    head_dim = getattr(bcfg, "head_dim", None) or bcfg.hidden_size // heads
    return Shapes(
        base=n_base,
        new=sum(p.numel() for m in model.new_modules() for p in m.parameters()),
        lora=lora,
        micro=sum(p.numel() for p in model.micro.parameters()),
        layers=bcfg.num_hidden_layers,
        hidden=bcfg.hidden_size,
        intermediate=bcfg.intermediate_size,
        kv_hidden=getattr(bcfg, "num_key_value_heads", heads) * head_dim,
        vocab=bcfg.vocab_size,
    )


def zero_stage(cfg, shapes: Shapes, world: int, gpu_bytes: int | None) -> tuple[int, str]:
    """The ZeRO stage the run will use (ds_config auto decided as the trainer decides; None
    device bytes: CPU ranks)."""
    from trainer.train.strategy import ROOT, auto_ds_config

    if cfg.ds_config == "auto":
        name, why = auto_ds_config(shapes.base + shapes.new, world, gpu_bytes)  # as the trainer counts
        path = ROOT / "ds_configs" / name
    else:
        path, why = Path(cfg.ds_config), cfg.ds_config
    ds = json.loads(Path(path).read_text())
    return int(ds.get("zero_optimization", {}).get("stage", 3)), why


def memory(cfg, s: Shapes, stage: int, world: int, tokens: int, cpu: bool = False) -> dict[str, float]:
    """Bytes per rank by component, for a micro-batch of `tokens` macro positions. AdamW under
    ZeRO keeps fp32 master weights and two fp32 moments per trainable parameter (12 bytes; 8 for
    fp32 weights without ZeRO); a CPU rank also holds its libraries (RUNTIME_CPU) and a step's
    temporaries beyond its counted tensors (STEP_TEMPORARIES_CPU)."""
    h = cfg.model.hamburger
    bt = cfg.base_training
    trainable = s.new + (s.lora if bt == "lora" else 0) + (s.base if bt == "full" else 0)
    total = s.base + s.new + s.lora
    fp32 = cfg.precision == "fp32" or (cpu and cfg.precision == "auto")
    w = 4 if fp32 else 2
    opt = 12 if stage >= 1 or not fp32 else 8  # ZeRO keeps fp32 master partitions even of fp32 weights
    shard = world if stage == 3 else 1
    out = {
        "runtime": RUNTIME_CPU if cpu else 0.0,
        "parameters": total * w / shard,
        "gradients": trainable * w / (world if stage >= 2 else 1),
        "optimizer": trainable * opt / (world if stage >= 1 else 1),
        "teacher": (s.base * w / shard) if h.kl_weight > 0 else 0.0,
    }
    if stage == 3:  # gathered layers in flight (prefetch + live parameters), at most the model
        out["zero3_working_set"] = min(total, 2 * (s.base // max(s.layers, 1)) + s.micro) * w
    # activations: each base layer keeps its input when checkpointed, else its whole working set
    d, i, kv = s.hidden, s.intermediate, s.kv_hidden
    per_layer = tokens * w * (4 * d + 2 * kv + 3 * i)  # norms' inputs, q, k, v, attention out, MLP
    kept = tokens * w * d * s.layers if cfg.model.gradient_checkpointing else per_layer * s.layers
    out["activations"] = kept + (per_layer if cfg.model.gradient_checkpointing else 0)
    out["hidden_states"] = (
        tokens * w * d * (s.layers + 1)
    )  # output_hidden_states: the feature layers read them
    k = h.max_segment_len
    micro_positions = tokens * (h.num_features + k - 1)  # at most one segment per macro position
    out["micro_decoder"] = micro_positions * w * (4 * d + 2 * kv + 3 * i) * h.micro_layers
    response = tokens * k
    chunk = min(response, h.loss_chunk_tokens or response)
    out["loss"] = chunk * s.vocab * 4 * 3 + response * d * 4 * 2  # fp32 logits, softmax, grad; o_j
    if cpu:
        step = ("activations", "hidden_states", "micro_decoder", "loss")
        out["step_temporaries"] = STEP_TEMPORARIES_CPU * sum(out[k] for k in step)
    return out


def step_flops(cfg, s: Shapes, tokens_per_step: int) -> float:
    """Forward + backward FLOPs of one optimiser step: 6 per parameter per position where the
    weights train, 4 where only activations need gradients (a frozen or LoRA base)."""
    h = cfg.model.hamburger
    base_factor = 6 if cfg.base_training == "full" else 4
    base = base_factor * s.base * tokens_per_step
    micro = 6 * s.micro * tokens_per_step * (h.num_features + h.max_segment_len - 1)
    head = 6 * s.vocab * s.hidden * tokens_per_step * h.max_segment_len
    teacher = (
        2 * s.base * tokens_per_step * h.max_segment_len if (h.kl_weight > 0 or h.align_weight > 0) else 0
    )
    return float(base + micro + head + teacher)


def largest_fitting(cfg, s: Shapes, stage: int, world: int, budget: float, cpu: bool = False) -> int:
    """The largest tokens_per_batch (a multiple of 256) whose estimate fits `budget` bytes."""
    lo, hi = 0, 1 << 20
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256 or 256
        if sum(memory(cfg, s, stage, world, mid, cpu).values()) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def plan(
    cfg, gpus: int, nodes: int, gpu_gib: float, mfu: float, gpu: str, cpu: bool = False
) -> tuple[str, bool]:
    """(the report, whether it fits). cpu: ranks on CPU (fp32 unless configured, ZeRO-3 by auto)."""
    world = gpus * nodes
    s = model_shapes(cfg)
    gpu_bytes = int(gpu_gib * GIB)
    stage, why = zero_stage(cfg, s, world, None if cpu else gpu_bytes)
    tokens = cfg.data.tokens_per_batch
    mem = memory(cfg, s, stage, world, tokens, cpu)
    need = sum(mem.values())
    fits = need <= FIT_SHARE * gpu_bytes
    step_tokens = tokens * world * cfg.optim.grad_accum
    flops = step_flops(cfg, s, step_tokens)
    seconds = flops / (world * PEAK_TFLOPS[gpu] * 1e12 * mfu)
    lines = [
        f"plan: {cfg.model.base} + HAMburger (K={cfg.model.hamburger.max_segment_len}), base {cfg.model.base_training}, "
        f"{world} {'CPU ranks' if cpu else 'GPUs'} ({nodes} x {gpus}) of {gpu_gib:.0f} GiB, ZeRO-{stage} ({why})",
        f"parameters: base {s.base / 1e6:.1f}M, grafted {s.new / 1e6:.1f}M"
        + (f", LoRA {s.lora / 1e6:.2f}M" if s.lora else ""),
        "",
        f"| per {'rank' if cpu else 'GPU'} | GiB |",
        "|---|---|",
        *(f"| {k} | {v / GIB:.2f} |" for k, v in mem.items()),
        f"| **total** | **{need / GIB:.2f}** (fits under {FIT_SHARE:.0%} of {gpu_gib:.0f} GiB: {'yes' if fits else 'NO'}) |",
        "",
        f"tokens per step: {tokens} macro positions x {world} ranks x {cfg.optim.grad_accum} accumulation "
        f"= {step_tokens:,} (up to K x that many response tokens)",
        f"FLOPs per step: {flops / 1e12:,.1f} TFLOP"
        + ("" if cpu else f"; at {mfu:.0%} MFU of {gpu.upper()} bf16 peak a step takes {seconds:.2f} s"),
        "(estimates: counted tensors, worst case of one K-token segment per macro position; "
        'docs/BENCHMARKS.md "plan" compares them with measured peaks)',
    ]
    if not fits:
        largest = largest_fitting(cfg, s, stage, world, FIT_SHARE * gpu_bytes, cpu)
        rows = cfg.data.row_capacity
        if largest >= rows:
            fixes = [f"data.tokens_per_batch={largest} (the largest that fits)"]
        elif largest:  # a micro-batch holds at least one row
            fixes = [
                f"data.tokens_per_batch={largest} with data.row_capacity={largest} (the largest that fits)"
            ]
        else:
            fixes = ["more GPUs"]
        if not cfg.model.gradient_checkpointing:
            fixes.append("model.gradient_checkpointing=true")
        if stage < 3:
            fixes.append("ds_config=ds_configs/zero3_bf16.json")
        if cfg.model.base_training == "full":
            fixes.append("model.base_training=lora")
        lines.append(f"refused: {need / GIB:.1f} GiB per GPU does not fit; change " + ", or ".join(fixes))
    return "\n".join(lines), fits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, as for train")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs (or CPU ranks, with --cpu) per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: the --gpu's)")
    ap.add_argument("--gpu", default="h100", choices=sorted(PEAK_TFLOPS))
    ap.add_argument(
        "--mfu", type=float, default=0.4, help="the model FLOPs utilisation the step time assumes"
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="CPU ranks (fp32 under precision auto; --gpu-mem: host GiB per rank)",
    )
    args = ap.parse_args(argv)
    if args.gpu_mem is None:
        args.gpu_mem = 80.0 if args.cpu else GPU_MEM_GIB[args.gpu]
    from hamburger.configio import load_config
    from trainer.train.config import TrainConfig

    for name, value, ok in (
        ("--gpus", args.gpus, args.gpus >= 1),
        ("--nodes", args.nodes, args.nodes >= 1),
        ("--gpu-mem", args.gpu_mem, args.gpu_mem > 0),
        ("--mfu", args.mfu, 0 < args.mfu <= 1),
    ):
        if not ok:
            raise SystemExit(f"[plan] error: {name} {value} is out of range")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        report, fits = plan(cfg, args.gpus, args.nodes, args.gpu_mem, args.mfu, args.gpu, args.cpu)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"[plan] error: {e}") from None
    print(report)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
