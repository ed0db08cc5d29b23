"""The training data's batch plan (each sample once per epoch, within the token budget, the same
on every rank) and the held-out batches (the same number of forwards on every rank)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import random_sample

from trainer.train.data import BatchPlan, eval_batches


def test_batch_plan_covers_each_sample_once_within_budget_and_agrees_across_ranks():
    rng = random.Random(0)
    samples = [random_sample(rng, 96, 4, rng.randint(2, 9), rng.randint(1, 30), sid=i) for i in range(97)]
    lens = [s.macro_len for s in samples]
    plan = BatchPlan(lens, tokens_per_batch=64, world_size=2, grad_accum=3, seed=5)
    batches = plan.global_batches(0)
    assert len(batches) % 6 == 0 and batches
    for b in batches:
        assert sum(samples[i].macro_len for i in b) <= 64 or len(b) == 1
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) == 1  # no sample twice in an epoch
    dropped = set(range(97)) - set(used)
    whole = BatchPlan(lens, 64, 1, 1, seed=5).global_batches(0)
    assert len(whole) - len(batches) < 6 and dropped == {i for b in whole[len(batches) :] for i in b}
    assert plan.rank_batches(0, 0) + plan.rank_batches(0, 1) != [] and sorted(
        map(tuple, plan.rank_batches(0, 0) + plan.rank_batches(0, 1))
    ) == sorted(map(tuple, batches))
    assert plan.global_batches(0) == BatchPlan(lens, 64, 2, 3, seed=5).global_batches(0)  # a pure function
    assert plan.global_batches(1) != batches  # a new order each epoch
    assert plan.steps_per_epoch() == len(batches) // 6
    assert plan.total_steps(epochs=3, max_steps=-1) == 3 * plan.steps_per_epoch()
    assert plan.total_steps(epochs=3, max_steps=2) == 2
    with pytest.raises(ValueError, match="too little training data for one optimiser step of 2 ranks x 3"):
        BatchPlan(lens[:2], 64, 2, 3, seed=5).total_steps(1, -1)


def test_eval_batches_give_every_rank_the_same_number_of_forwards():
    rng = random.Random(1)
    samples = [random_sample(rng, 96, 4, 4, rng.randint(1, 20), sid=i) for i in range(11)]
    per_rank = [eval_batches([s.macro_len for s in samples], 40, 3, r) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    real = [i for p in per_rank for b, w in p if w > 0 for i in b]
    assert sorted(real) == list(range(11))  # each held-out sample counted once (padding has weight 0)


def test_the_epoch_plan_is_built_once_per_epoch_not_per_step(monkeypatch):
    """Trainer.step asks for its rank's batches at every step: building the plan there cost
    185 ms per step at 100k samples. It is built once per epoch, and equals a fresh build."""
    rng = random.Random(0)
    samples = [random_sample(rng, 96, 4, rng.randint(2, 9), rng.randint(1, 30), sid=i) for i in range(300)]
    lens = [s.macro_len for s in samples]
    plan = BatchPlan(lens, tokens_per_batch=64, world_size=2, grad_accum=1, seed=5)
    builds = []
    real = BatchPlan.build
    monkeypatch.setattr(BatchPlan, "build", lambda self, e: builds.append(e) or real(self, e))
    for _ in range(50):  # fifty steps of epoch 0 on both ranks, then epoch 1
        a, b = plan.rank_batches(0, 0), plan.rank_batches(0, 1)
    plan.rank_batches(1, 0)
    assert builds == [0, 1]
    fresh = BatchPlan(lens, 64, 2, 1, seed=5)
    assert a == fresh.build(0)[0::2] and b == fresh.build(0)[1::2]
    for epoch in (2, 3, 4):  # only the newest two epochs are kept
        plan.rank_batches(epoch, 0)
    assert sorted(plan._epochs) == [3, 4]


def test_loss_chunks_are_what_the_rank_with_the_most_response_tokens_needs():
    """Every rank makes as many LM-head calls as the busiest one (ZeRO-3 gathers are collective)."""
    from trainer.train.data import loss_chunks

    ranks = [15, 40, 1]  # response tokens of each rank's micro-batch
    assert loss_chunks(ranks, 16) == 3 and loss_chunks(ranks, 40) == 1 and loss_chunks(ranks, 0) == 1
