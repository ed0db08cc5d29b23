"""`./launch.sh train CONFIG [key=value ...]`: fine-tune base + grafted modules under ZeRO-3.

config -> data -> strategy (DeepSpeed) -> loop: forward, finite check, backward, step, log,
eval, checkpoint. Every rank runs this file; rank 0 logs and writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.shards import load_manifest

from .assets import resolve_model
from .checkpoint import (
    check_world_size,
    checkpoint_root,
    latest_checkpoint,
    mark_complete,
    prune,
    read_info,
    rng_state,
    set_rng_state,
    tag_for,
)
from .config import TrainConfig
from .configio import load_config, to_flat_dict, to_yaml
from .data import BatchPlan, eval_batches, load_samples, manifest_summary
from .engine import Strategy
from .model import collate, generate
from .runcheck import RunMismatch, check_data_fits_model, check_resume_matches
from .tracking import Tracker, flatten_params


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Position:
    """Where training stands: enough to continue exactly (with the engine's own state)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next micro-batch of this rank within the epoch
    samples_seen: int = 0


METRIC_KEYS = ("loss", "ce", "stop_bce", "kl")


def reduce_outputs(strategy: Strategy, records: list[tuple[dict, int, float]]) -> dict[str, float]:
    """Token-weighted means over micro-batches and ranks. records: (values, tokens, weight)."""
    keys = sorted({k for values, _, _ in records for k in values})
    sums = [sum(v.get(k, 0.0) * n * w for v, n, w in records) for k in keys]
    counts = [sum(n * w for v, n, w in records if k in v) for k in keys]
    totals = strategy.all_reduce_sum(sums + counts)
    return {k: totals[i] / max(totals[len(keys) + i], 1e-9) for i, k in enumerate(keys)}


def output_values(out) -> dict[str, float]:
    values = {k: getattr(out, k).detach().item() for k in METRIC_KEYS if getattr(out, k) is not None}
    values.update({k: v.item() for k, v in out.metrics.items()})
    return values


def check_finite(strategy: Strategy, loss: torch.Tensor, step: int, sample_ids: list[int]) -> None:
    """All ranks agree whether any loss is NaN/inf; if so, all stop, naming rank, step and samples."""
    bad = 0.0 if torch.isfinite(loss).item() else 1.0
    if strategy.all_reduce_sum([bad])[0] == 0:
        return
    reports = strategy.all_gather_object((strategy.rank, bad, sample_ids))
    where = "; ".join(f"rank {r}: samples {ids}" for r, b, ids in reports if b)
    raise NonFiniteLoss(
        f"non-finite loss at step {step + 1} ({where}). Lower the learning rate, check these "
        "samples, or resume from the last checkpoint."
    )


def evaluate(strategy: Strategy, samples, cfg: TrainConfig) -> dict[str, float]:
    strategy.train(False)
    k = cfg.model.hamburger.max_steps
    records = []
    with torch.no_grad():
        for idx, weight in eval_batches(
            samples, cfg.data.tokens_per_batch, strategy.world_size, strategy.rank, cfg.eval_max_batches
        ):
            batch = collate([samples[i] for i in idx], k, cfg.data.row_capacity)
            out = strategy.forward(batch)
            records.append((output_values(out), batch.num_response_tokens, weight))
    strategy.train(True)
    if not records:
        return {}
    result = reduce_outputs(strategy, records)
    result["perplexity"] = math.exp(min(result["ce"], 50.0))
    return {f"eval/{k}": v for k, v in result.items()}


def save(strategy: Strategy, cfg: TrainConfig, pos: Position, run_id: str | None) -> None:
    root = checkpoint_root(cfg.output_dir)
    tag = tag_for(pos.step)
    client = {"position": pos.__dict__, "rng": rng_state(), "run_id": run_id}
    strategy.save_checkpoint(str(root), tag, client)
    strategy.barrier()  # every rank's files are on disk before the marker
    if strategy.is_rank0:
        model = strategy.model
        mark_complete(
            root / tag,
            {
                "step": pos.step,
                "world_size": strategy.world_size,
                "run_id": run_id,
                "base": cfg.model.base,
                "base_path": resolve_model(cfg.model.base),
                "base_architecture": type(model.base).__name__,
                "base_config": model.base.config.to_dict(),
                "hamburger": model.config.to_dict(),
                "data": cfg.data.path,  # set to the resolved prep folder in train()
                "data_key_hash": load_manifest(cfg.data.path)["key_hash"],
            },
        )
        prune(root, cfg.keep_last)
    strategy.barrier()


def probe_generations(strategy: Strategy, samples, n: int = 2, max_new_tokens: int = 24) -> list[dict]:
    """Greedy HAMburger decodes of a few held-out prompts, inside the engine: a sanity sample for
    the run and the reference an export must reproduce. Every rank decodes the same prompts,
    so ZeRO-3's parameter gathers line up."""
    strategy.train(False)
    eos = strategy.model.base.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    out = []
    for s in samples[:n]:
        prompt = list(s.input_ids[: s.prompt_len])
        res = generate(
            strategy.model, prompt, max_new_tokens=max_new_tokens, confidence=0.5, eos_token_ids=eos_ids
        )
        out.append(
            {
                "sample_id": s.sample_id,
                "prompt_ids": prompt,
                "confidence": 0.5,
                "max_new_tokens": max_new_tokens,
                "tokens": res.tokens,
                "seg_lens": res.seg_lens,
            }
        )
    strategy.train(True)
    return out


def resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data.path:
        return Path(cfg.data.path)
    from data_prep.config import PrepConfig
    from data_prep.run import prepare

    return prepare(load_config(PrepConfig, cfg.data.prep_config, cfg.data.prep_overrides))


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(checkpoint_root(cfg.output_dir))
    ckpt = Path(cfg.resume)
    if not ckpt.is_dir() or not (ckpt / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: not a complete checkpoint folder")
    return ckpt


def set_aside_old_checkpoints(output_dir: str) -> None:
    """resume=none in a folder that has checkpoints: keep them (renamed), so a fresh run's
    checkpoints never mix with another run's and resume=auto never picks an old one."""
    root = checkpoint_root(output_dir)
    if root.is_dir() and any(root.iterdir()):
        aside = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        root.rename(aside)
        print(f"[train] resume=none: moved the folder's earlier checkpoints to {aside}", flush=True)


def train(cfg: TrainConfig) -> dict:
    strategy = Strategy(cfg)
    strategy.setup_distributed()
    rank0 = strategy.is_rank0
    out_dir = Path(cfg.output_dir)

    data_dir = resolve_data(cfg)
    cfg.data.path = str(data_dir)
    train_samples = load_samples(data_dir, "train")
    eval_samples = load_samples(data_dir, cfg.data.eval_split, expand_copies=False)
    if rank0:
        resolve_model(cfg.model.base)  # converts the embedded model once
    strategy.barrier()
    # Checked before anything is built or written: a refused job leaves the run folder untouched.
    for warning in check_data_fits_model(data_dir, cfg.model.base, cfg.model.hamburger, train_samples):
        if rank0:
            print(f"[train] warning: {warning}", flush=True)
    ckpt = find_resume_checkpoint(cfg)
    if ckpt is not None:
        check_world_size(ckpt, strategy.world_size)
        data_hash = load_manifest(data_dir)["key_hash"]
        check_resume_matches(read_info(ckpt), ckpt, cfg.model.base, cfg.model.hamburger, data_hash)
    if rank0:
        if ckpt is None and cfg.resume == "none":
            set_aside_old_checkpoints(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        (out_dir / "ds_config.json").write_text(json.dumps(strategy.ds_config, indent=1))
    plan = BatchPlan(
        train_samples,
        cfg.data.tokens_per_batch,
        strategy.world_size,
        cfg.optim.grad_accum,
        cfg.seed,
        cfg.data.shuffle,
    )
    steps_per_epoch = plan.steps_per_epoch()
    if steps_per_epoch == 0:
        raise ValueError(
            f"{data_dir}: too little training data for one optimiser step of "
            f"{strategy.world_size} ranks x {cfg.optim.grad_accum} micro-batches"
        )
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total

    model = strategy.build_model(resolve_model(cfg.model.base))
    strategy.prepare(model, total)

    pos, run_id = Position(), None
    if ckpt is not None:
        client = strategy.load_checkpoint(str(ckpt.parent), ckpt.name)
        pos = Position(**client["position"])
        set_rng_state(client["rng"])
        run_id = read_info(ckpt).get("run_id")
        if rank0:
            print(f"[train] resumed from {ckpt} at step {pos.step}", flush=True)
        if pos.step >= total:  # a finished run: retraining nothing would log NaNs and re-save
            if rank0:
                print(
                    f"[train] {ckpt} is at step {pos.step} of {total}: this run is finished, nothing to do "
                    "(another output_dir, or resume=none, starts a new run)",
                    flush=True,
                )
            strategy.shutdown()
            final = out_dir / "final_metrics.json"
            return json.loads(final.read_text()) if final.is_file() else {}

    tracker = Tracker(
        cfg.output_dir,
        cfg.mlflow.enabled,
        cfg.mlflow.tracking_uri,
        cfg.mlflow.experiment,
        cfg.mlflow.run_name,
        run_id=run_id,
        writer=rank0,
    )
    run_id = strategy.broadcast_object(tracker.run_id)
    if rank0:
        (out_dir / "run_info.json").write_text(
            json.dumps({"run_id": run_id, "tracking_uri": tracker.uri, "data": str(data_dir)}, indent=1)
        )
        summary = manifest_summary(data_dir)
        tracker.log_params(
            {
                **flatten_params("", {k: v for k, v in to_flat_dict(cfg).items()}),
                **flatten_params("ds", strategy.ds_config),
                **flatten_params("data_manifest", summary),
                "world_size": str(strategy.world_size),
                "steps_total": str(total),
            }
        )
        tracker.set_tags({"data_manifest_hash": summary["key_hash"], "base_model": cfg.model.base})
        for f in ("config.yaml", "ds_config.json"):
            tracker.log_artifact(out_dir / f)
        tracker.log_artifact(Path(data_dir) / "manifest.json")

    final = run_loop(strategy, cfg, plan, train_samples, eval_samples, pos, total, tracker, run_id)
    tracker.close()
    strategy.shutdown()
    return final


def run_loop(strategy, cfg, plan, train_samples, eval_samples, pos, total, tracker, run_id) -> dict:
    rank0 = strategy.is_rank0
    k = cfg.model.hamburger.max_steps
    accum = cfg.optim.grad_accum
    bar = tqdm(
        total=total, initial=pos.step, disable=not rank0, desc="train", unit="step", dynamic_ncols=True
    )
    last: dict[str, float] = {}
    strategy.train(True)
    while pos.step < total:
        batches = plan.rank_batches(pos.epoch, strategy.rank)
        if pos.batch >= len(batches):
            pos.epoch, pos.batch = pos.epoch + 1, 0
            continue
        t0 = time.perf_counter()
        records, tokens = [], 0
        for micro in range(accum):
            idx = batches[pos.batch + micro]
            samples = [train_samples[i] for i in idx]
            batch = collate(samples, k, cfg.data.row_capacity)
            out = strategy.forward(batch)
            check_finite(strategy, out.loss, pos.step, [s.sample_id for s in samples])
            strategy.backward(out.loss)
            strategy.step()
            records.append((output_values(out), batch.num_response_tokens, 1.0))
            tokens += sum(len(s.input_ids) for s in samples)
        pos.batch += accum
        pos.step += 1
        pos.samples_seen += (
            sum(len(batches[pos.batch - accum + m]) for m in range(accum)) * strategy.world_size
        )
        metrics = reduce_outputs(strategy, records)
        total_tokens = strategy.all_reduce_sum([tokens])[0]
        metrics.update(strategy.lrs())
        metrics["grad_norm"] = strategy.grad_norm()
        metrics["tokens_per_s"] = total_tokens / (time.perf_counter() - t0)
        metrics["epoch"] = pos.epoch
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if pos.step % cfg.log_every == 0 or pos.step == total:
            tracker.log_metrics(metrics, pos.step)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            tps=f"{metrics['expected_tokens_per_step']:.2f}",
        )
        bar.update(1)
        last = metrics
        if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < total and eval_samples:
            tracker.log_metrics(evaluate(strategy, eval_samples, cfg), pos.step)
        if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < total:
            save(strategy, cfg, pos, run_id)
    bar.close()
    final = dict(last)
    if eval_samples:
        ev = evaluate(strategy, eval_samples, cfg)
        tracker.log_metrics(ev, pos.step)
        final.update(ev)
    save(strategy, cfg, pos, run_id)
    probes = probe_generations(strategy, eval_samples or train_samples)
    if rank0:
        (Path(cfg.output_dir) / "samples.json").write_text(json.dumps(probes, indent=1))
        tracker.log_artifact(Path(cfg.output_dir) / "samples.json")
        summary = {k: v for k, v in final.items() if isinstance(v, float)}
        (Path(cfg.output_dir) / "final_metrics.json").write_text(json.dumps(summary, indent=1))
        print(
            f"[train] done: step {pos.step}, loss {final.get('loss', float('nan')):.4f}, "
            f"eval loss {final.get('eval/loss', float('nan')):.4f}, "
            f"expected tokens/step {final.get('eval/expected_tokens_per_step', float('nan')):.3f}",
            flush=True,
        )
    return final


def main(argv: list[str] | None = None) -> None:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or "=" in args[0]:
        raise SystemExit("usage: ./launch.sh train CONFIG.yaml [key=value ...]")
    try:
        cfg = load_config(TrainConfig, args[0], args[1:])
    except ValueError as e:  # ConfigError and range checks: the message names the key
        raise SystemExit(f"[train] config error: {e}") from None
    try:
        train(cfg)
    except Exception as e:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if isinstance(e, NonFiniteLoss | RunMismatch):
            print(f"[train] rank {rank}: stopped: {e}", file=sys.stderr, flush=True)
        else:
            print(
                f"[train] rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
