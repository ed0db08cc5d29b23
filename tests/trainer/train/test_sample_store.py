"""The memory-mapped sample store: the same samples as reading the shards whole (the slow,
obviously correct reference), converted once per manifest, safe on a read-only folder, and a
corrupt shard named."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_sample

from data_prep.shards import SCHEMA_VERSION, ShardError, read_split, write_shard
from trainer.train.sample_store import open_samples


def _prep_folder(folder: Path, sizes: dict[str, list[int]], seed: int = 0) -> Path:
    """A prep folder with the shard schema: one shard per entry of sizes[split] (its row count)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits, sid = {}, 0
    for split, shard_rows in sizes.items():
        infos = []
        for j, n in enumerate(shard_rows):
            rows = {k: [] for k in ("sample_id", "source", "origin", "copies", "input_ids")}
            rows.update(prompt_len=[], seg_lens=[], values=[], meta=[])
            for _ in range(n):
                s = random_sample(rng, 30000, 4, rng.randint(1, 9), rng.randint(1, 40), sid=sid)
                sid += 1
                for key, value in (
                    ("sample_id", s.sample_id),
                    ("source", "t"),
                    ("origin", f"t.jsonl:{sid}"),
                    ("copies", rng.choice([1, 1, 2, 3])),
                    ("input_ids", s.input_ids),
                    ("prompt_len", s.prompt_len),
                    ("seg_lens", s.seg_lens),
                    ("values", []),
                    ("meta", "{}"),
                ):
                    rows[key].append(value)
            infos.append(write_shard(folder, f"{split}-{j:05d}", rows, {}).to_dict())
        splits[split] = {"shards": infos}
    manifest = {"schema_version": SCHEMA_VERSION, "key": {"label": {}}, "splits": splits}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _reference(folder: Path, split: str, expand: bool) -> list[tuple]:
    """What training read before the store: every row of the split, repeated by its copies."""
    out = []
    for r in read_split(folder, split).to_pylist():
        for _ in range(r["copies"] if expand else 1):
            out.append((r["input_ids"], r["prompt_len"], r["seg_lens"], r["sample_id"]))
    return out


def test_the_store_gives_the_shards_samples_with_their_copies(tmp_path):
    folder = _prep_folder(tmp_path / "prep", {"train": [7, 0, 13, 5], "eval": [4], "empty": []})
    for split, expand in (("train", True), ("train", False), ("eval", False), ("empty", True)):
        store = open_samples(folder, split, expand)
        want = _reference(folder, split, expand)
        got = [(s.input_ids, s.prompt_len, s.seg_lens, s.sample_id) for s in store]
        assert got == want, split
        assert list(store.macro_lens) == [s.macro_len for s in store]
        assert list(store.response_lens) == [s.response_len for s in store]
        assert store.max_token == max((max(w[0]) for w in want), default=-1)
        idx = [0, len(store) - 1] if len(store) else []
        assert store.response_tokens(idx) == sum(store[i].response_len for i in idx)
        assert [s.sample_id for s in store[1:3]] == [w[3] for w in want[1:3]]
    with pytest.raises(ShardError, match="no split 'test'"):
        open_samples(folder, "test")


def test_the_store_is_converted_once_and_again_when_the_data_changes(tmp_path, monkeypatch):
    import trainer.train.sample_store as ss

    folder = _prep_folder(tmp_path / "prep", {"train": [6, 6]})
    calls = []
    real = ss._convert
    monkeypatch.setattr(ss, "_convert", lambda *a: calls.append(1) or real(*a))
    open_samples(folder, "train")
    open_samples(folder, "train")
    assert len(calls) == 1  # a later run maps the finished conversion
    _prep_folder(folder, {"train": [3, 9]}, seed=1)  # re-prepared: a new manifest
    store = open_samples(folder, "train")
    assert len(calls) == 2
    assert [s.sample_id for s in store] == [r[3] for r in _reference(folder, "train", True)]


def test_a_corrupt_shard_is_named_and_nothing_half_written_is_kept(tmp_path):
    folder = _prep_folder(tmp_path / "prep", {"train": [5, 5]})
    shard = folder / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ShardError, match=r"train-00001\.parquet: corrupt shard"):
        open_samples(folder, "train")
    assert not [p for p in (folder / ".store").iterdir() if p.is_dir()]


def test_a_read_only_prep_folder_still_trains(tmp_path, monkeypatch):
    """A prep folder on a read-only share: the store goes to the system's temporary folder."""
    import tempfile

    folder = _prep_folder(tmp_path / "prep", {"train": [4]})
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):
        if self.parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    store = open_samples(folder, "train")
    assert len(store) == len(_reference(folder, "train", True))
    assert not (folder / ".store").exists()
    assert str(store.folder).startswith(str(tmp_path / "tmp" / "hamburger-store"))


@pytest.mark.distributed  # starts three processes, as three ranks would
def test_ranks_opening_a_split_at_once_convert_it_once(tmp_path):
    """Every rank opens the split at the same moment; the file lock lets one convert."""
    folder = _prep_folder(tmp_path / "prep", {"train": [40, 40, 40]})
    code = (
        "import sys; from trainer.train.sample_store import open_samples;"
        "s = open_samples(sys.argv[1], 'train'); print(len(s), sum(s.response_lens))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    ref = _reference(folder, "train", True)
    assert outs[0].split() == [str(len(ref)), str(sum(len(r[0]) - r[1] for r in ref))]
    assert len([p for p in (folder / ".store").iterdir() if p.is_dir()]) == 1
