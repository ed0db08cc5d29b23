"""The held-out split is a property of the data, not of where it lies on disk."""

from __future__ import annotations

import shutil

from helpers import tiny_model_dir, write_jsonl

from data_prep.config import LabelConfig, PrepConfig, SourceConfig
from data_prep.run import prepare
from data_prep.shards import read_split


def _held_out_rows(folder) -> set[str]:
    return {origin.rsplit("/", 1)[-1] for origin in read_split(folder, "eval").column("origin").to_pylist()}


def test_the_same_file_in_another_folder_gets_the_same_held_out_rows(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    rows = [{"instruction": f"Say {i}.", "output": f"{i} and {i + 1}"} for i in range(60)]
    a = write_jsonl((tmp_path / "here").mkdir() or tmp_path / "here" / "chat.jsonl", rows)
    b = tmp_path / "there" / "deeper" / "chat.jsonl"
    b.parent.mkdir(parents=True)
    shutil.copy(a, b)
    splits = []
    for path in (a, b):
        cfg = PrepConfig(
            model=str(model),
            sources=[SourceConfig(path=str(path))],
            output_root=str(tmp_path / "prep"),
            heldout_fraction=0.2,
            label=LabelConfig(strategy="fixed"),
        )
        splits.append(_held_out_rows(prepare(cfg)))
    assert splits[0] and splits[0] == splits[1]
