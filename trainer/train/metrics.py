"""What a training step reports, reduced over micro-batches and ranks, and the held-out
evaluation and sample generations made inside the strategy during training."""

from __future__ import annotations

import math

import torch

from hamburger.decode import generate
from hamburger.model import Sample, collate
from trainer.train.config import TrainConfig
from trainer.train.data import eval_batches
from trainer.train.strategy import DeepSpeedStrategy

METRIC_KEYS = ("loss", "ce", "stop_bce", "kl")


class NonFiniteLoss(RuntimeError):
    pass


def reduce_outputs(strategy: DeepSpeedStrategy, records: list[tuple[dict, int, float]]) -> dict[str, float]:
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


def held_out_metrics(strategy: DeepSpeedStrategy, samples: list[Sample], cfg: TrainConfig) -> dict[str, float]:
    """Loss and HAMburger metrics on the held-out split (eval/...), every rank its share."""
    strategy.train(False)
    records = []
    with torch.no_grad():
        for idx, weight in eval_batches(
            samples, cfg.data.tokens_per_batch, strategy.world_size, strategy.rank, cfg.eval_max_batches
        ):
            batch = collate(
                [samples[i] for i in idx],
                cfg.model.hamburger.max_steps,
                cfg.data.row_capacity,
                with_plain=cfg.model.hamburger.kl_weight > 0,  # the teacher reads the plain tokens
            )
            out = strategy.forward(batch)
            records.append((output_values(out), batch.num_response_tokens, weight))
    strategy.train(True)
    if not records:
        return {}
    result = reduce_outputs(strategy, records)
    result["perplexity"] = math.exp(min(result["ce"], 50.0))
    return {f"eval/{k}": v for k, v in result.items()}


def probe_generations(
    strategy: DeepSpeedStrategy, samples: list[Sample], n: int = 2, max_new_tokens: int = 24
) -> list[dict]:
    """Greedy HAMburger decodes of a few held-out prompts, inside the strategy: a sanity sample for
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
