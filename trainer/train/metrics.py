"""What a training step reports, reduced over micro-batches and ranks, and the finiteness
check every rank agrees on. Held-out evaluation is trainer/train/validate.py."""

from __future__ import annotations

import torch

from trainer.train.strategy import DeepSpeedStrategy

METRIC_KEYS = ("loss", "ce", "stop_bce", "kl", "align")


class NonFiniteLoss(RuntimeError):
    pass


def reduce_outputs(strategy: DeepSpeedStrategy, records: list[tuple[dict, int, float]]) -> dict[str, float]:
    """Token-weighted means over micro-batches and ranks. records: (values, tokens, weight), the
    values 0-d tensors still on the device: they are summed there and read back in one transfer
    (one host sync per step, not one per metric and micro-batch)."""
    keys = sorted({k for values, _, _ in records for k in values})
    sums = [
        sum(torch.as_tensor(v[k], dtype=torch.float64) * (n * w) for v, n, w in records if k in v)
        for k in keys
    ]
    counts = [float(sum(n * w for v, n, w in records if k in v)) for k in keys]
    host = torch.stack([s.detach().to("cpu", torch.float64) for s in sums]).tolist() if keys else []
    totals = strategy.all_reduce_sum(host + counts)
    return {k: totals[i] / max(totals[len(keys) + i], 1e-9) for i, k in enumerate(keys)}


def output_values(out) -> dict[str, torch.Tensor]:
    """The step's loss terms and metrics as detached 0-d tensors (no host sync here)."""
    values = {k: getattr(out, k).detach() for k in METRIC_KEYS if getattr(out, k) is not None}
    values.update({k: v.detach() for k, v in out.metrics.items()})
    return values


def response_tokens(samples) -> int:
    """Response tokens of a micro-batch, from the samples on the host (the batch's tgt_lens
    would need a device sync)."""
    return sum(s.response_len for s in samples)


def check_finite(strategy: DeepSpeedStrategy, loss: torch.Tensor, step: int, sample_ids: list[int]) -> None:
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
