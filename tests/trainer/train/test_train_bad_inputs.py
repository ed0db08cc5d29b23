"""The training config's part of the bad-input matrix: one case per line, and the message fragment
the user must see (it names the key). A new case is one line in the table."""

from __future__ import annotations

import re

import pytest

from hamburger.configio import load_config

# ================================================================ training: config values
# (key=value overrides, message fragment naming the key); each case gets data.path=x first
# fmt: off
TRAIN_CONFIG_CASES = [
    (["optim.warmup_steps=-1"], "'optim.warmup_steps': must be >= 0"),
    (["optim.betas=[0.9,1.0]"], "'optim.betas.1': must be in [0, 1)"),
    (["optim.betas=[-0.1,0.9]"], "'optim.betas.0': must be in [0, 1)"),
    (["optim.betas=[0.9]"], "'optim.betas': must be two values"),
    (["optim.lr_base=.nan"], "'optim.lr_base': must be a finite number >= 0"),
    (["optim.lr_new=-1e-4"], "'optim.lr_new': must be a finite number >= 0"),
    (["optim.min_lr=.inf"], "'optim.min_lr': must be a finite number >= 0"),
    (["optim.grad_clip=-1"], "'optim.grad_clip': must be a finite number >= 0"),
    (["optim.weight_decay=-0.1"], "'optim.weight_decay': must be a finite number >= 0"),
    (["optim.eps=0"], "'optim.eps': must be a finite number > 0"),
    (["optim.grad_accum=0"], "'optim.grad_accum': must be >= 1"),
    (["max_steps=0"], "'max_steps': must be -1 (off) or >= 1"),
    (["max_steps=-5"], "'max_steps': must be -1 (off) or >= 1"),
    (["epochs=0"], "'epochs': must be >= 1"),
    (["log_every=0"], "'log_every': must be >= 1"),
    (["eval_every=-5"], "'eval_every': must be >= 0 (0: off)"),
    (["save_every=-1"], "'save_every': must be >= 0 (0: off)"),
    (["eval_max_batches=-1"], "'eval_max_batches': must be >= 0 (0: off)"),
    (["keep_last=0"], "'keep_last': must be >= 1"),
    (["dist_timeout_s=0"], "'dist_timeout_s': must be >= 1"),
    (["data.tokens_per_batch=0"], "'data.tokens_per_batch': must be >= 1"),
    (["data.row_capacity=8192"], "'data.row_capacity': must be <= data.tokens_per_batch (4096)"),
    (["precision=fp16"], "'precision': Invalid value 'fp16', expected one of [auto, bf16, fp32]"),
    (["model.hamburger.packed_attention=sparse"], "'model.hamburger.packed_attention': Invalid value 'sparse', expected one of [auto, dense, flex]"),
    (["model.hamburger.stop_weight=.nan"], "hamburger.stop_weight must be >= 0"),
    (["model.hamburger.max_segment_len=0"], "max_segment_len"),
    (["output_dir=${oc.env:HOME}"], "output_dir: interpolations are not allowed"),
    (["optim.lr=1"], "optim.lr"),
    (["model.base_training=adapter"], "'model.base_training': Invalid value 'adapter', expected one of [full, frozen, lora]"),
    (["model.base_training=lora", "optim.lr_base=0"], "optim.lr_base is 0 with model.base_training=lora"),
    (["model.base_training=lora", "model.lora.rank=0"], "model.lora.rank must be >= 1"),
    (["model.base_training=lora", "model.lora.dropout=1.5"], "model.lora.dropout must be in [0, 1)"),
    (["model.lora.rnak=4"], "model.lora.rnak"),
    (["phases=[{name: a, steps: 1}]", "resume=/x"], "resume=/x with phases: a recipe resumes each phase"),
    (["phases=[{name: a, steps: 0}]"], "'phases.0.steps': must be >= 1"),
    (["phases=[{name: a, steps: 1}, {name: a, steps: 1}]"], "phases.1.name 'a' names two phases"),
    (["phases=[{name: a, steps: 1, overrides: [max_steps=3]}]"], "phases.0.overrides: max_steps is set by the recipe"),
    (["epochs=1.5"], "epochs"),
]
# fmt: on


@pytest.mark.parametrize(
    "overrides,fragment", TRAIN_CONFIG_CASES, ids=[" ".join(c[0]) for c in TRAIN_CONFIG_CASES]
)
def test_train_config_value_names_the_key(overrides, fragment):
    from trainer.train.config import TrainConfig

    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_config(TrainConfig, None, ["data.path=x", *overrides])
