"""Config files and overrides (hamburger.configio): a bad file names the file or the key, one case
per line; interpolations are refused in overrides."""

from __future__ import annotations

import re

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
