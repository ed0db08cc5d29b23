"""Config files and overrides (hamburger.configio): a bad file names the file or the key, one case
per line; interpolations are refused in overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hamburger.configio import ConfigError, load_config
from trainer.train.config import TrainConfig

# ================================================================ config files
# (YAML file text, message fragment: it names the file)
# fmt: off
CONFIG_FILE_CASES = [
    ("- a\n- b\n", "c.yaml: the top level must be a mapping of config keys, but it is a list"),
    ("just words\n", "Key 'just words' not in 'TrainConfig'"),
    ("data: [1,\n", "c.yaml: not valid YAML"),
    ("data:\n  path: x\noptim:\n  lr_base: fast\n", "'optim.lr_base'"),
    ("data:\n  path: x\nepochs: 0\n", "'epochs': must be >= 1"),
]
# fmt: on


@pytest.mark.parametrize("text,fragment", CONFIG_FILE_CASES, ids=[c[1][:30] for c in CONFIG_FILE_CASES])
def test_config_file_error_names_the_file_or_key(tmp_path, text, fragment):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_config(TrainConfig, tmp_path / "c.yaml")


def test_interpolations_are_refused_in_overrides():
    with pytest.raises(ConfigError, match=r"output_dir: interpolations are not allowed"):
        load_config(TrainConfig, None, ["data.path=x", "output_dir=${oc.env:HOME}"])


def test_an_override_can_set_one_entry_of_a_list():
    """`sources.0.weight=0.25` sets that field of that entry (a dotlist merge would have raised
    a bare TypeError); a missing entry, a wrong field or type and a key without an index are
    refused naming the override."""
    from data_prep.config import PrepConfig

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(
        PrepConfig, configs / "prep_distill.yaml", ["sources.0.weight=0.25", "sources.2.name=lib"]
    )
    assert (
        [s.weight for s in cfg.sources][:1] == [0.25]
        and cfg.sources[2].name == "lib"
        and len(cfg.sources) == 3
    )
    staged = load_config(TrainConfig, configs / "train_staged.yaml", ["phases.1.steps=7"])
    assert [p.steps for p in staged.phases] == [12, 7]
    for bad, match in (
        ("sources.5.weight=1", r"'sources' has 3 entries, no entry '5'"),
        ("sources.0.wieght=1", r"Key 'wieght' not in 'SourceConfig'"),
        ("sources.0.weight=abc", r"could not be converted to Float"),
        ("sources.x.weight=1", r"a list lies on the way to 'sources.x.weight'"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(PrepConfig, configs / "prep_distill.yaml", [bad])
