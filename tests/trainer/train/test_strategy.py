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


@pytest.mark.parametrize(
    "params, world, device_gib, expected",
    [
        (1_500_000_000, 1, 141, "zero2_bf16.json"),  # a 1B base (+ grafted modules) on one H200: 24 GiB
        (1_500_000_000, 8, 80, "zero2_bf16.json"),
        (8_000_000_000, 1, 80, "zero3_bf16.json"),  # an 8B base on one 80 GB GPU: 119 GiB
        (8_000_000_000, 8, 80, "zero2_bf16.json"),  # 8 GPUs: 15 + 13 GiB, under half of 80
        (30_000_000_000, 8, 80, "zero3_bf16.json"),  # 30B on 8: 56 + 49 GiB
        (8_000_000_000, 64, 141, "zero2_bf16.json"),
        (135_000_000, 2, None, "zero3_cpu.json"),  # CPU ranks: always ZeRO-3 (the demo, the tests)
    ],
)
def test_ds_config_auto_takes_zero2_when_its_model_states_fit(params, world, device_gib, expected):
    from trainer.train.strategy import auto_ds_config

    name, why = auto_ds_config(params, world, None if device_gib is None else device_gib * 2**30)
    assert name == expected, why


def test_parameters_are_counted_from_the_config_without_loading(tmp_path):
    from helpers import tiny_model_dir
    from transformers import AutoModelForCausalLM

    from hamburger.model import HAMburgerConfig, HAMburgerModel
    from trainer.train.strategy import count_parameters

    folder = tiny_model_dir(tmp_path / "m", layers=1)
    hcfg = HAMburgerConfig(embedder_head_dim=16, micro_layers=1)
    real = HAMburgerModel(AutoModelForCausalLM.from_pretrained(str(folder)), hcfg)
    assert count_parameters(str(folder), hcfg) == sum(p.numel() for p in real.parameters())
