"""The Trainer: one training job, from set-up through the loop to the final summary.

Trainer.setup (data, checks, model, strategy) -> resume -> fit: step, log, held-out metrics,
checkpoint. Every rank runs it; rank 0 logs and writes.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.shards import load_manifest
from hamburger.assets import resolve_model
from hamburger.configio import to_flat_dict, to_yaml
from hamburger.model import collate
from hamburger.model.folder_check import check_model_folder
from trainer.export.zero_files import verify_loadable
from trainer.train.checkpoint import (
    Checkpointer,
    CheckpointInfo,
    check_world_size,
    find_resume_checkpoint,
    rng_state,
    set_aside_old_checkpoints,
    set_rng_state,
)
from trainer.train.config import TrainConfig
from trainer.train.curves import write_run_curves
from trainer.train.data import BatchPlan, loss_chunks, manifest_summary, resolve_data
from trainer.train.metrics import check_finite, output_values, reduce_outputs, response_tokens
from trainer.train.phases import Phase, initial_state
from trainer.train.runcheck import check_data_fits_model, check_resume_matches
from trainer.train.sample_store import SampleStore, open_samples
from trainer.train.strategy import DeepSpeedStrategy
from trainer.train.tracking import Tracker, flatten_params
from trainer.train.validate import Validator, probe_generations


@dataclass
class Position:
    """Where training stands: enough to continue exactly (with the strategy's own state)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next micro-batch of this rank within the epoch

    @classmethod
    def from_dict(cls, data: dict) -> Position:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


class Trainer:
    """One training job. Its state is declared here, grouped as torchtitan does; every method
    runs on every rank (rank 0 alone writes files and talks to MLflow)."""

    # configs
    cfg: TrainConfig
    out_dir: Path
    # components
    strategy: DeepSpeedStrategy
    tracker: Tracker | None
    plan: BatchPlan
    validator: Validator
    checkpointer: Checkpointer
    # data
    data_dir: Path
    data_key_hash: str  # the prep manifest's identity, recorded in every checkpoint
    train_samples: SampleStore
    eval_samples: SampleStore
    # runtime state
    pos: Position
    total_steps: int
    run_id: str | None
    resume_from: Path | None

    def __init__(self, cfg: TrainConfig, phase: Phase | None = None):
        self.cfg = cfg
        self.phase = phase
        self.step_offset = phase.step_offset if phase else 0  # MLflow steps run on across phases
        self.strategy = DeepSpeedStrategy(cfg)
        self.tracker = None
        self.pos = Position()
        self.run_id = None
        self.resume_from = None
        self.out_dir = Path(cfg.output_dir)

    @property
    def rank0(self) -> bool:
        return self.strategy.is_rank0

    def log(self, msg: str) -> None:
        if self.rank0:
            print(f"[train] {msg}", flush=True)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data and every check first (a refused job writes nothing), then model and strategy."""
        cfg = self.cfg
        self.strategy.setup_distributed()
        self.data_dir = resolve_data(cfg.data)
        cfg.data.path = str(self.data_dir)
        self.data_key_hash = load_manifest(self.data_dir)["key_hash"]
        self.train_samples = open_samples(self.data_dir, "train")
        self.eval_samples = open_samples(self.data_dir, cfg.data.eval_split, expand_copies=False)
        if self.rank0:
            resolve_model(cfg.model.base)  # converts the embedded model once
        self.strategy.barrier()
        check_model_folder(resolve_model(cfg.model.base))  # a local folder whole, named file at fault
        if not self.eval_samples:
            self.log(
                f"warning: {self.data_dir} has no rows in split {cfg.data.eval_split!r}: no held-out metrics "
                "(re-run prep with heldout_fraction in (0, 1))"
            )
        for warning in check_data_fits_model(
            self.data_dir, cfg.model.base, cfg.model.hamburger, self.train_samples.max_token
        ):
            self.log(f"warning: {warning}")
        self.resume_from = find_resume_checkpoint(cfg.resume, cfg.output_dir)
        if self.resume_from is not None:
            check_world_size(self.resume_from, self.strategy.world_size)
            verify_loadable(self.resume_from, self.strategy.world_size)  # before DeepSpeed unpickles
            check_resume_matches(
                CheckpointInfo.read(self.resume_from), self.resume_from, cfg, self.data_key_hash
            )
        d = cfg.data
        self.plan = BatchPlan(
            self.train_samples.macro_lens,
            d.tokens_per_batch,
            self.strategy.world_size,
            cfg.optim.grad_accum,
            cfg.seed,
            d.shuffle,
        )
        self.total_steps = self.plan.total_steps(cfg.epochs, cfg.max_steps, where=str(self.data_dir))
        if self.rank0:
            if self.resume_from is None and cfg.resume == "none":
                set_aside_old_checkpoints(cfg.output_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.strategy.ds_config, indent=1))
        model = self.strategy.build_model(resolve_model(cfg.model.base))
        if cfg.init_from and self.resume_from is None:  # a resumed run has its weights already
            names = [n for n, _ in model.named_parameters()]
            lora = cfg.model.lora.to_dict() if cfg.model.base_training == "lora" else None
            self.strategy.load_weights(model, initial_state(cfg.init_from, cfg.model.base, names, lora))
            self.log(f"weights from {cfg.init_from}")
        self.strategy.prepare(model, self.total_steps)
        self.validator = Validator(cfg, self.eval_samples)
        lora = cfg.model.base_training == "lora"
        identity = {
            "base": cfg.model.base,
            "base_path": resolve_model(cfg.model.base),
            "data": str(self.data_dir),
            "data_key_hash": self.data_key_hash,
            "base_training": cfg.base_training,
            "lora": cfg.model.lora.to_dict() if lora else {},
        }
        self.checkpointer = Checkpointer(
            cfg.output_dir, cfg.save_every, cfg.keep_last, self.strategy, identity
        )

    def resume(self) -> None:
        """Continue exactly where the checkpoint stopped: weights, optimiser, schedule, data
        position, RNG states and the MLflow run."""
        ckpt = self.resume_from
        if ckpt is None:
            return
        client = self.strategy.load_checkpoint(str(ckpt.parent), ckpt.name)
        self.pos = Position.from_dict(client["position"])
        set_rng_state(client["rng"])
        self.run_id = CheckpointInfo.read(ckpt).run_id
        self.log(f"resumed from {ckpt} at step {self.pos.step}")

    def start_tracking(self) -> None:
        cfg, rank0 = self.cfg, self.rank0
        m = cfg.mlflow
        if self.run_id is None and self.phase is not None:
            self.run_id = self.phase.run_id  # a later phase continues the recipe's MLflow run
        tracker = Tracker(
            cfg.output_dir, m.enabled, m.tracking_uri, m.experiment, m.run_name, self.run_id, rank0
        )
        self.tracker = tracker
        self.run_id = self.strategy.broadcast_object(tracker.run_id)
        if not rank0:
            return
        run_info = {"run_id": self.run_id, "tracking_uri": tracker.uri, "data": str(self.data_dir)}
        (self.out_dir / "run_info.json").write_text(json.dumps(run_info, indent=1))
        summary = manifest_summary(self.data_dir)
        params = {
            **flatten_params("", dict(to_flat_dict(cfg))),
            **flatten_params("ds", self.strategy.ds_config),
            **flatten_params("data_manifest", summary),
            "world_size": str(self.strategy.world_size),
            "steps_total": str(self.total_steps),
        }
        tags = {"data_manifest_hash": summary["key_hash"], "base_model": cfg.model.base}
        folder = None  # a recipe's phases keep their files apart in the one run
        if self.phase is not None:
            tags["phase"] = self.phase.name
            prefix = f"phase.{self.phase.index + 1}.{self.phase.name}"
            folder = self.out_dir.name
            params = {f"{prefix}.{k}": v for k, v in params.items()} | {
                f"{prefix}.first_step": str(self.step_offset + 1)
            }
        files = [
            self.out_dir / "config.yaml",
            self.out_dir / "ds_config.json",
            self.data_dir / "manifest.json",
        ]
        tracker.log_run_start(params, tags, files, folder)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, float]:
        pos = self.pos
        if pos.step >= self.total_steps:  # a finished run: retraining nothing would log NaNs and re-save
            return self.already_finished()
        self.start_tracking()
        bar = tqdm(
            total=self.total_steps, initial=pos.step, disable=not self.rank0, desc="train", unit="step"
        )
        metrics: dict[str, float] = {}
        self.strategy.train(True)
        while pos.step < self.total_steps:
            metrics = self.step()
            if pos.step % self.cfg.log_every == 0 or pos.step == self.total_steps:
                self.tracker.log_metrics(metrics, self.step_offset + pos.step)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tps=f"{metrics['expected_tokens_per_step']:.2f}")
            bar.update(1)
            if self.validator.due(pos.step, self.total_steps):
                self.tracker.log_metrics(self.validator.run(self.strategy), self.step_offset + pos.step)
            if self.checkpointer.due(pos.step, self.total_steps):
                self.save()
        bar.close()
        held_out = self.validator.run(self.strategy)
        if held_out:
            self.tracker.log_metrics(held_out, self.step_offset + pos.step)
        self.save()
        final = {**metrics, **held_out}
        self.write_summary(final)
        return final

    def already_finished(self) -> dict[str, float]:
        self.log(
            f"{self.resume_from} is at step {self.pos.step} of {self.total_steps}: this run is finished, "
            "nothing to do (another output_dir, or resume=none, starts a new run)"
        )
        final = self.out_dir / "final_metrics.json"
        return json.loads(final.read_text()) if final.is_file() else {}

    def step(self) -> dict[str, float]:
        """One optimiser step: grad_accum packed micro-batches on every rank, then metrics
        reduced over micro-batches and ranks."""
        cfg, pos, strategy = self.cfg, self.pos, self.strategy
        batches = self.plan.rank_batches(pos.epoch, strategy.rank)
        if pos.batch >= len(batches):
            pos.epoch, pos.batch = pos.epoch + 1, 0
            batches = self.plan.rank_batches(pos.epoch, strategy.rank)
        t0 = time.perf_counter()
        records, tokens = [], 0
        for micro in range(cfg.optim.grad_accum):
            samples = [self.train_samples[i] for i in batches[pos.batch + micro]]
            plain = cfg.model.hamburger.needs_plain  # KL and alignment read the plain tokens
            batch = collate(
                samples, cfg.model.hamburger.max_segment_len, cfg.data.row_capacity, with_plain=plain
            )
            batch.loss_chunks = loss_chunks(
                [
                    self.train_samples.response_tokens(b[pos.batch + micro])
                    for b in self.plan.all_ranks(pos.epoch)
                ],
                cfg.model.hamburger.loss_chunk_tokens,
            )
            out = strategy.forward(batch)
            check_finite(strategy, out.loss, pos.step, [s.sample_id for s in samples])
            strategy.backward(out.loss)
            strategy.step()
            records.append((output_values(out), response_tokens(samples), 1.0))
            tokens += sum(len(s.input_ids) for s in samples)
        pos.batch += cfg.optim.grad_accum
        pos.step += 1
        metrics = reduce_outputs(strategy, records)
        metrics.update(strategy.lrs())
        metrics["grad_norm"] = strategy.grad_norm()
        metrics["tokens_per_s"] = strategy.all_reduce_sum([tokens])[0] / (time.perf_counter() - t0)
        metrics["epoch"] = pos.epoch
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # rank 0's peak resident memory (what ./launch.sh plan estimates for a CPU rank)
            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    # ---------------------------------------------------------------- saving and the end
    def save(self) -> None:
        client = {"position": asdict(self.pos), "rng": rng_state(), "run_id": self.run_id}
        self.checkpointer.save(self.pos.step, client, self.run_id)

    def write_summary(self, final: dict[str, float]) -> None:
        probes = probe_generations(self.strategy, self.eval_samples or self.train_samples)
        if not self.rank0:
            return
        (self.out_dir / "samples.json").write_text(json.dumps(probes, indent=1))
        self.tracker.log_artifact(self.out_dir / "samples.json")
        summary = {k: v for k, v in final.items() if isinstance(v, float)}
        summary.update(write_run_curves(self.out_dir, self.tracker))  # PNG + end slope; only warns
        (self.out_dir / "final_metrics.json").write_text(json.dumps(summary, indent=1))
        self.log(
            f"done: step {self.pos.step}, loss {final.get('loss', float('nan')):.4f}, "
            f"eval loss {final.get('eval/loss', float('nan')):.4f}, "
            f"expected tokens/step {final.get('eval/expected_tokens_per_step', float('nan')):.3f}"
        )

    def close(self, failed: bool = False, shutdown: bool = True) -> None:
        """shutdown=False (a recipe phase before the last) keeps the process group for the next."""
        if self.tracker is not None:
            self.tracker.close("FAILED" if failed else "FINISHED")
        if not failed and shutdown:  # a failed rank exits; the launcher ends the others
            self.strategy.shutdown()
        elif not failed:
            self.strategy.release()
