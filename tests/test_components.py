"""The trainer's small components, each on its own: the DeepSpeed config it fills and refuses,
the learning-rate schedule, the batch plan, checkpoint pruning, config interpolations."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from conftest import random_sample

from hamburger.configio import ConfigError, load_config
from trainer.train.checkpoint import COMPLETE, complete_checkpoints, prune
from trainer.train.config import TrainConfig
from trainer.train.data import BatchPlan, eval_batches
from trainer.train.strategy import build_ds_config, lr_schedule


def _cfg(tmp_path, ds: dict, *overrides: str) -> TrainConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(TrainConfig, None, ["data.path=x", f"ds_config={path}", "precision=fp32", *overrides])


def test_deepspeed_file_gets_the_training_configs_values_and_conflicts_are_refused(tmp_path):
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3},
    }
    filled = build_ds_config(_cfg(tmp_path, ds, "optim.grad_accum=4", "optim.grad_clip=0.5"), world_size=2)
    assert filled["gradient_accumulation_steps"] == 4 and filled["gradient_clipping"] == 0.5
    assert filled["train_batch_size"] == 8 and filled["bf16"]["enabled"] is False

    for key, value, fragment in [
        ("gradient_clipping", 2.0, "gradient_clipping=2.0 disagrees with the training config (1.0)"),
        ("gradient_accumulation_steps", 3, "gradient_accumulation_steps=3 disagrees"),
        ("bf16", {"enabled": True}, "bf16.enabled=True disagrees with precision=fp32"),
        ("fp16", {"enabled": True}, "fp16 is not supported"),
    ]:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            build_ds_config(_cfg(tmp_path, {**ds, key: value}), world_size=1)


def test_learning_rate_warms_up_then_decays_to_the_floor_keeping_the_groups_ratio():
    w = torch.nn.Parameter(torch.zeros(1))
    v = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1e-4}, {"params": [v], "lr": 2e-4}])
    sched = lr_schedule(opt, warmup_steps=4, total_steps=20, floor_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    base = [a for a, _ in lrs]
    assert base[:5] == pytest.approx([0, 0.25e-4, 0.5e-4, 0.75e-4, 1e-4])  # linear warm-up
    assert all(a > b for a, b in zip(base[4:], base[5:], strict=False))  # then strictly decreasing
    assert base[12] == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5)  # cosine half-way
    assert lrs[-1][0] > 1e-5 and sched.get_last_lr()[0] == pytest.approx(1e-5)  # floor = min_lr at the end
    assert all(b == pytest.approx(2 * a) for a, b in lrs)  # the new modules keep twice the base's rate


def test_batch_plan_covers_each_sample_once_within_budget_and_agrees_across_ranks():
    rng = random.Random(0)
    samples = [random_sample(rng, 96, 4, rng.randint(2, 9), rng.randint(1, 30), sid=i) for i in range(97)]
    plan = BatchPlan(samples, tokens_per_batch=64, world_size=2, grad_accum=3, seed=5)
    batches = plan.global_batches(0)
    assert len(batches) % 6 == 0 and batches
    for b in batches:
        assert sum(samples[i].macro_len for i in b) <= 64 or len(b) == 1
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) == 1  # no sample twice in an epoch
    dropped = set(range(97)) - set(used)
    whole = BatchPlan(samples, 64, 1, 1, seed=5).global_batches(0)
    assert len(whole) - len(batches) < 6 and dropped == {i for b in whole[len(batches) :] for i in b}
    assert plan.rank_batches(0, 0) + plan.rank_batches(0, 1) != [] and sorted(
        map(tuple, plan.rank_batches(0, 0) + plan.rank_batches(0, 1))
    ) == sorted(map(tuple, batches))
    assert plan.global_batches(0) == BatchPlan(samples, 64, 2, 3, seed=5).global_batches(0)  # a pure function
    assert plan.global_batches(1) != batches  # a new order each epoch
    assert plan.steps_per_epoch() == len(batches) // 6
    assert plan.total_steps(epochs=3, max_steps=-1) == 3 * plan.steps_per_epoch()
    assert plan.total_steps(epochs=3, max_steps=2) == 2
    with pytest.raises(ValueError, match="too little training data for one optimiser step of 2 ranks x 3"):
        BatchPlan(samples[:2], 64, 2, 3, seed=5).total_steps(1, -1)


def test_eval_batches_give_every_rank_the_same_number_of_forwards():
    rng = random.Random(1)
    samples = [random_sample(rng, 96, 4, 4, rng.randint(1, 20), sid=i) for i in range(11)]
    per_rank = [eval_batches(samples, 40, 3, r) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    real = [i for p in per_rank for b, w in p if w > 0 for i in b]
    assert sorted(real) == list(range(11))  # each held-out sample counted once (padding has weight 0)


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step, complete in [(2, True), (4, True), (5, False), (6, True), (8, True), (9, False)]:
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        if complete:
            (d / COMPLETE).write_text("{}")
    prune(tmp_path, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    # an incomplete older one (a killed save) goes; a newer one (a save in progress) stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006", "step_000008", "step_000009"]


def test_interpolations_are_refused_in_overrides():
    with pytest.raises(ConfigError, match=r"output_dir: interpolations are not allowed"):
        load_config(TrainConfig, None, ["data.path=x", "output_dir=${oc.env:HOME}"])
