"""Training data: prep shards -> samples -> packed micro-batches, split over ranks.

Samples are read by index from an on-disk store (sample_store.py). The batch plan of an
epoch is a pure function of (sample lengths, seed, epoch, world size): every rank computes the
same global list of micro-batches and takes every world_size-th one. Resuming at micro-batch i
therefore needs no data to be read or skipped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.shards import load_manifest
from trainer.train.config import DataConfig


def manifest_summary(folder: str | Path) -> dict:
    """The manifest's headline numbers, for logging."""
    m = load_manifest(folder)
    return {
        "key_hash": m["key_hash"],
        "model": m["key"]["model"],
        "strategy": m["key"]["label"]["strategy"],
        "max_segment_len": m["key"]["label"]["max_segment_len"],
        "rows_out": m["rows_out"],
        "response_tokens": m["response_tokens"],
        "compression": round(m["compression"], 4),
        "segment_histogram": m["segment_histogram"],
    }


@dataclass
class BatchPlan:
    macro_lens: Sequence[int]
    """Base positions of each sample (SampleStore.macro_lens): all the plan needs to know."""
    tokens_per_batch: int
    world_size: int
    grad_accum: int
    seed: int
    shuffle: bool = True
    _epochs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """epoch -> (global batches, {rank: its batches}): the plan is built once per epoch (and on
    resume), not at every step; only the two newest epochs are kept."""

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Micro-batches (sample indices) of an epoch, a multiple of world_size * grad_accum long
        (shared: do not mutate)."""
        if epoch not in self._epochs:
            self._epochs[epoch] = (self.build(epoch), {})
            for old in sorted(self._epochs)[:-2]:
                del self._epochs[old]
        return self._epochs[epoch][0]

    def build(self, epoch: int) -> list[list[int]]:
        """The epoch's plan, from scratch. Greedy in a seeded order: a batch takes samples while
        their macro positions fit the budget. The tail that cannot fill a whole optimiser step is
        dropped (at most world_size * grad_accum - 1 micro-batches), as every rank must step
        together."""
        order = list(range(len(self.macro_lens)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        lens = np.asarray(self.macro_lens, dtype=np.int64)[order].tolist()
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i, n in zip(order, lens, strict=True):
            if current and used + n > self.tokens_per_batch:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            batches.append(current)
        per_step = self.world_size * self.grad_accum
        return batches[: len(batches) - len(batches) % per_step]

    def rank_batches(self, epoch: int, rank: int) -> list[list[int]]:
        batches = self.global_batches(epoch)
        per_rank = self._epochs[epoch][1]
        if rank not in per_rank:
            per_rank[rank] = batches[rank :: self.world_size]
        return per_rank[rank]

    def all_ranks(self, epoch: int) -> list[list[list[int]]]:
        """Every rank's micro-batches of the epoch (for decisions all ranks must agree on)."""
        return [self.rank_batches(epoch, r) for r in range(self.world_size)]

    def steps_per_epoch(self) -> int:
        return len(self.global_batches(0)) // (self.world_size * self.grad_accum)

    def total_steps(self, epochs: int, max_steps: int, where: str = "the data") -> int:
        """Optimiser steps of a run: every epoch's steps, capped by max_steps (-1: no cap)."""
        per_epoch = self.steps_per_epoch()
        if per_epoch == 0:
            raise ValueError(
                f"{where}: too little training data for one optimiser step of "
                f"{self.world_size} ranks x {self.grad_accum} micro-batches"
            )
        return min(per_epoch * epochs, max_steps) if max_steps > 0 else per_epoch * epochs


def loss_chunks(response_tokens: Sequence[int], chunk_tokens: int) -> int:
    """LM-head calls of the chunked loss for one micro-batch step, the same on every rank: enough
    for the rank with the most response tokens (one count per rank). Every rank knows every
    rank's batch (the plan is global), so this needs no communication."""
    from hamburger.model.chunked_loss import chunks_for

    return chunks_for(max(response_tokens, default=0), chunk_tokens)


def eval_batches(
    macro_lens: Sequence[int], tokens_per_batch: int, world_size: int, rank: int, limit: int = 0
):
    """This rank's held-out micro-batches as (indices, weight). Ranks must run the same number of
    forwards (ZeRO-3 gathers are collective), so short ranks repeat a batch with weight 0."""
    plan = BatchPlan(macro_lens, tokens_per_batch, 1, 1, seed=0, shuffle=False).global_batches(0)
    if limit:
        plan = plan[: limit * world_size]
    per_rank = -(-len(plan) // world_size) if plan else 0
    mine = plan[rank::world_size]
    out = [(b, 1.0) for b in mine]
    while len(out) < per_rank:
        out.append((plan[0], 0.0))
    return out


def resolve_data(cfg: DataConfig) -> Path:
    """data.path, or the folder data.prep_config prepares (every rank joins; finished shards are reused)."""
    if cfg.path:
        return Path(cfg.path)
    from data_prep.config import PrepConfig
    from data_prep.run import prepare
    from hamburger.configio import load_config

    return prepare(load_config(PrepConfig, cfg.prep_config, cfg.prep_overrides))
