"""`./launch.sh train CONFIG [key=value ...]`: the entry point every rank runs.

Reads the config (an unknown key or a wrong type names the key), runs the Trainer, and turns a
failure into one message (hamburger/refusal.py: a refusal once, a fault with its traceback).
"""

from __future__ import annotations

import sys

from hamburger.configio import load_config
from hamburger.io import DiskFullError
from hamburger.refusal import REFUSALS, exit_on
from trainer.export.zero_files import ZeroFileError
from trainer.train.config import TrainConfig
from trainer.train.metrics import NonFiniteLoss
from trainer.train.phases import Phase, phase_config
from trainer.train.runcheck import RunMismatch
from trainer.train.trainer import Trainer


def train(cfg: TrainConfig) -> dict[str, float]:
    """One run, or a staged recipe's phases one after another (trainer/train/phases.py)."""
    if not cfg.phases:
        return run(Trainer(cfg))
    configs = [phase_config(cfg, i) for i in range(len(cfg.phases))]  # every phase checked before any trains
    final, run_id, offset = {}, None, 0
    for i, (phase, phase_cfg) in enumerate(zip(cfg.phases, configs, strict=True)):
        trainer = Trainer(phase_cfg, Phase(phase.name, i, offset, run_id))
        final = run(trainer, last=i == len(cfg.phases) - 1)
        run_id, offset = trainer.run_id, offset + trainer.total_steps
    return final


def run(trainer: Trainer, last: bool = True) -> dict[str, float]:
    """Set up, resume, fit; close the tracker (and, after the last run, the process group)."""
    try:
        trainer.setup()
        trainer.resume()
        final = trainer.fit()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close(shutdown=last)
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
    except Exception as e:  # noqa: BLE001 - a refusal is one message, once; a fault its traceback
        exit_on("train", e, (*REFUSALS, NonFiniteLoss, RunMismatch, ZeroFileError, DiskFullError))
