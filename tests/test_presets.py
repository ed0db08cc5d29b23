"""Every shipped config loads through the typed config the trainer reads, and every train preset
agrees with its prep (the base that scores the data is the base that trains; one K)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from data_prep.config import PrepConfig
from hamburger.configio import load_config
from hamburger.model.families import unsupported_traits
from trainer.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TRAIN = [p for p in CONFIGS if not p.name.startswith("prep_")]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_shipped_config_loads_and_validates(path):
    cfg = load_config(PrepConfig if path.name.startswith("prep_") else TrainConfig, path)
    cfg.validate()


@pytest.mark.parametrize("path", TRAIN, ids=[p.name for p in TRAIN])
def test_a_train_preset_agrees_with_its_prep(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name their prep config relative to the checkout
    train = load_config(TrainConfig, path)
    assert train.data.prep_config, f"{path.name}: a preset names the prep that labels its data"
    prep = load_config(PrepConfig, train.data.prep_config, train.data.prep_overrides)
    prep.validate()
    assert prep.model == train.model.base, f"{path.name}: its data must be scored by its own base"
    assert prep.label.max_segment_len == train.model.hamburger.max_segment_len
    assert train.data.row_capacity >= prep.max_len, "a row must hold the longest sample prep keeps"


# The published config.json fields of each hub preset's base (the base its YAML names) that decide
# whether HAMburger reproduces it (no hub here; a refusal rule that would refuse a preset fails).
PRESET_BASES = {
    "llama-3.2-1b.yaml": ("LlamaConfig", {"max_position_embeddings": 131072}),
    "llama-3.2-3b.yaml": ("LlamaConfig", {"max_position_embeddings": 131072}),
    "qwen2.5-1.5b.yaml": (
        "Qwen2Config",
        {"sliding_window": 32768, "use_sliding_window": False, "max_position_embeddings": 32768},
    ),
    "qwen3-1.7b.yaml": (
        "Qwen3Config",
        {"sliding_window": None, "use_sliding_window": False, "max_position_embeddings": 40960},
    ),
}


def test_every_preset_base_is_a_supported_family():
    hub = {p.name for p in TRAIN if load_config(TrainConfig, p).model.base != "builtin:smollm2"}
    assert hub == set(PRESET_BASES), "a new preset's base needs its row here"
    for name, (config_cls, fields) in PRESET_BASES.items():
        if not hasattr(transformers, config_cls):
            continue
        assert unsupported_traits(getattr(transformers, config_cls)(**fields)) == [], name
