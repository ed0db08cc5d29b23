"""Held-out evaluation during training: when it runs, what it measures, and the few greedy
generations written beside the final metrics. Every rank joins (ZeRO-3 gathers line up)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hamburger.decode import generate
from hamburger.model import Sample, collate
from trainer.train.config import TrainConfig
from trainer.train.data import eval_batches, loss_chunks
from trainer.train.metrics import output_values, reduce_outputs, response_tokens
from trainer.train.sample_store import SampleStore
from trainer.train.strategy import DeepSpeedStrategy


class Validator:
    """Decides when held-out metrics are due (every `eval_every` steps before the end, and once
    at the end) and computes them on the held-out split."""

    def __init__(self, cfg: TrainConfig, samples: SampleStore):
        self.cfg, self.samples = cfg, samples

    def due(self, step: int, total_steps: int) -> bool:
        """Between steps; the end has its own call (`final`)."""
        every = self.cfg.eval_every
        return bool(self.samples) and bool(every) and step % every == 0 and step < total_steps

    def run(self, strategy: DeepSpeedStrategy) -> dict[str, float]:
        return held_out_metrics(strategy, self.samples, self.cfg) if self.samples else {}


def held_out_metrics(strategy: DeepSpeedStrategy, samples: SampleStore, cfg: TrainConfig) -> dict[str, float]:
    """Loss and HAMburger metrics on the held-out split (eval/...), every rank its share."""
    strategy.train(False)
    records = []
    every_rank = [
        eval_batches(
            samples.macro_lens, cfg.data.tokens_per_batch, strategy.world_size, r, cfg.eval_max_batches
        )
        for r in range(strategy.world_size)
    ]
    with torch.no_grad():
        for n, (idx, weight) in enumerate(every_rank[strategy.rank]):
            batch = collate(
                [samples[i] for i in idx],
                cfg.model.hamburger.max_segment_len,
                cfg.data.row_capacity,
                with_plain=cfg.model.hamburger.needs_plain,  # KL and alignment read the plain tokens
            )
            batch.loss_chunks = loss_chunks(  # the same LM-head calls on every rank (ZeRO-3)
                [samples.response_tokens(r[n][0]) for r in every_rank], cfg.model.hamburger.loss_chunk_tokens
            )
            out = strategy.forward(batch)
            records.append((output_values(out), response_tokens([samples[i] for i in idx]), weight))
    strategy.train(True)
    if not records:
        return {}
    result = reduce_outputs(strategy, records)
    result["perplexity"] = math.exp(min(result["ce"], 50.0))
    return {f"eval/{k}": v for k, v in result.items()}


def probe_generations(
    strategy: DeepSpeedStrategy, samples: Sequence[Sample], n: int = 2, max_new_tokens: int = 24
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
