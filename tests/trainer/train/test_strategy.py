"""The DeepSpeed strategy's pure parts: the DeepSpeed config it fills from the training config
(and the conflicts it refuses), and the learning-rate schedule."""

from __future__ import annotations

import json

import pytest
import torch

from hamburger.configio import load_config
from trainer.train.config import TrainConfig
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
