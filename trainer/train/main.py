"""`./launch.sh train CONFIG [key=value ...]`: the entry point every rank runs.

Reads the config (an unknown key or a wrong type names the key), runs the Trainer, and turns a
failure into one message per rank (a traceback only for what is not a refusal).
"""

from __future__ import annotations

import sys
import traceback

import torch

from hamburger.configio import load_config
from trainer.export.zero_files import ZeroFileError
from trainer.train.config import TrainConfig
from trainer.train.metrics import NonFiniteLoss
from trainer.train.runcheck import RunMismatch
from trainer.train.trainer import Trainer


def train(cfg: TrainConfig) -> dict[str, float]:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.resume()
        final = trainer.fit()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
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
        if isinstance(e, NonFiniteLoss | RunMismatch | ZeroFileError):
            print(f"[train] rank {rank}: stopped: {e}", file=sys.stderr, flush=True)
        else:
            print(
                f"[train] rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(1)
