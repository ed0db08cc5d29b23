"""`./launch.sh plan`: memory per rank and step FLOPs from the config the trainer reads, on the
meta device; a config that cannot fit is refused naming the largest micro-batch that does."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_model_dir

from hamburger.configio import load_config
from trainer.tools.plan import FIT_SHARE, GIB, largest_fitting, main, memory, model_shapes, plan
from trainer.train.config import TrainConfig
from trainer.train.strategy import ROOT, count_parameters


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("plan") / "model", layers=2)


def _cfg(base, *overrides):
    return load_config(TrainConfig, None, [f"model.base={base}", "data.path=x", *overrides])


def test_the_plan_counts_what_the_optimiser_will_hold(base):
    cfg = _cfg(base, f"ds_config={ROOT / 'ds_configs' / 'zero3_bf16.json'}")
    s = model_shapes(cfg)
    assert s.base + s.new == count_parameters(str(base), cfg.model.hamburger)
    one, four = (memory(cfg, s, 3, world, 4096) for world in (1, 4))
    assert one["parameters"] == 2 * (s.base + s.new) and four["parameters"] == one["parameters"] / 4
    assert one["optimizer"] == 12 * (s.base + s.new)  # fp32 master + two moments, all trainable
    assert four["activations"] == one["activations"]  # per rank, not sharded
    zero1 = memory(cfg, s, 1, 4, 4096)
    assert zero1["parameters"] == one["parameters"] and zero1["optimizer"] == four["optimizer"]


def test_a_frozen_or_lora_base_carries_no_base_state(base):
    full = _cfg(base)
    s = model_shapes(full)
    for training in ("frozen", "lora"):
        cfg = _cfg(base, f"model.base_training={training}", "model.lora.rank=4")
        m, shapes = memory(cfg, model_shapes(cfg), 3, 1, 4096), model_shapes(cfg)
        assert m["optimizer"] == 12 * (shapes.new + shapes.lora)
        assert (shapes.lora > 0) == (training == "lora")
    assert memory(full, s, 3, 1, 4096)["optimizer"] == 12 * (s.base + s.new)


def test_a_config_that_cannot_fit_is_refused_naming_the_largest_micro_batch(base, capsys):
    cfg = _cfg(base, "data.tokens_per_batch=400000", "data.row_capacity=1024")
    report, fits = plan(cfg, 1, 1, 1.0, 0.4, "h100")
    assert not fits and "refused:" in report and "model.gradient_checkpointing=true" in report
    s = model_shapes(cfg)
    largest = largest_fitting(cfg, s, 3, 1, FIT_SHARE * GIB)
    suggestion = re.search(r"change (data\.tokens_per_batch=\d+)( with (data\.row_capacity=\d+))?", report)
    assert suggestion and suggestion.group(1) == f"data.tokens_per_batch={largest}"
    fixed = [suggestion.group(1), *([suggestion.group(3)] if suggestion.group(3) else [])]
    fixed_cfg = _cfg(base, "data.row_capacity=1024", *fixed)  # the advice is a valid config that fits
    assert plan(fixed_cfg, 1, 1, 1.0, 0.4, "h100")[1]
    assert sum(memory(cfg, s, 3, 1, largest).values()) <= FIT_SHARE * GIB
    assert sum(memory(cfg, s, 3, 1, largest + 512).values()) > FIT_SHARE * GIB
    with pytest.raises(SystemExit) as e:
        main([str(ROOT / "configs" / "train_demo.yaml"), f"model.base={base}", "--gpu-mem", "0.05"])
    assert e.value.code == 1 and "refused:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--mfu", "2"], "--mfu 2.0 is out of range"),
        (["--gpus", "0"], "--gpus 0 is out of range"),
        (["model.hamburger.max_segment_len=0"], "max_segment_len"),
    ],
)
def test_bad_plan_arguments_are_named(base, argv, fragment):
    with pytest.raises(SystemExit, match=fragment):
        main([str(ROOT / "configs" / "train_demo.yaml"), f"model.base={base}", *argv])
