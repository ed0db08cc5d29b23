"""A split's samples on disk, read by index: memory does not grow with the corpus.

Parquet shards are compressed, so they cannot be read in place. The first rank to open a split
converts it, one verified shard at a time, into flat uncompressed arrays (every token of every
sample in one int32 file, every segment length in one int8 file, per-sample offsets beside them).
Every rank then holds only the per-sample arrays (about 60 bytes per sample) and reads a
sample's tokens and segments from disk when a micro-batch asks for them, not about 36 bytes per
token as a Python list of every sample would. Those reads are served by the OS page cache,
which the ranks of a node share and the kernel gives back under memory pressure.

The converted arrays are keyed by the sha256 of the split's manifest (which holds each shard's
sha256), so a re-prepared folder is converted again and a finished conversion is reused by later
runs. They live in DATA/.store/, or in the system's temporary folder when DATA is read-only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from filelock import FileLock

from data_prep.shards import MANIFEST, ShardError, load_manifest, read_shard
from hamburger.io import sha256_file
from hamburger.model import Sample

STORE_VERSION = 1
_ARRAYS = {  # file -> dtype: flat per-token / per-segment values, then per-row values
    "tokens": np.int32,
    "segs": np.int8,
    "token_offsets": np.int64,
    "seg_offsets": np.int64,
    "prompt_len": np.int32,
    "sample_id": np.int64,
    "copies": np.int16,
}


class SampleStore(Sequence):
    """The samples of one split, in sample_id order, each row repeated by its source weight
    (`copies`) unless expand_copies is off. Indexing builds a `Sample`; the lengths the batch
    plan needs are numpy arrays, so planning an epoch reads no tokens."""

    def __init__(self, folder: Path, expand_copies: bool = True):
        self.folder = folder
        per_row = ("token_offsets", "seg_offsets", "prompt_len", "sample_id", "copies")
        a = {name: np.fromfile(folder / f"{name}.bin", dtype=_ARRAYS[name]) for name in per_row}
        self._tok_off, self._seg_off = a["token_offsets"], a["seg_offsets"]
        self._prompt, self._sid = a["prompt_len"], a["sample_id"]
        self._tokens = _Flat(folder / "tokens.bin", _ARRAYS["tokens"])
        self._segs = _Flat(folder / "segs.bin", _ARRAYS["segs"])
        copies = a["copies"].astype(np.int64) if expand_copies else 1
        self._rows = np.repeat(np.arange(len(self._prompt)), copies)  # sample index -> stored row
        lengths = np.diff(self._tok_off)[self._rows]
        n_segs = np.diff(self._seg_off)[self._rows]
        prompt = self._prompt[self._rows].astype(np.int64)
        self.macro_lens = prompt + n_segs - 1
        """Base positions of each sample (Sample.macro_len), what the batch plan packs by."""
        self.response_lens = lengths - prompt
        """Response tokens of each sample (Sample.response_len)."""
        self.max_token = int(json.loads((folder / "store.json").read_text())["max_token"])
        """The largest token id in the split (-1 when empty), for the vocabulary check."""

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self._rows[i])
        a, b = self._tok_off[row], self._tok_off[row + 1]
        c, d = self._seg_off[row], self._seg_off[row + 1]
        return Sample(
            input_ids=self._tokens.read(a, b),
            prompt_len=int(self._prompt[row]),
            seg_lens=self._segs.read(c, d),
            sample_id=int(self._sid[row]),
        )

    def response_tokens(self, indices: Sequence[int]) -> int:
        """Response tokens of a micro-batch, without building its samples."""
        return int(self.response_lens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0


def open_samples(data_dir: str | Path, split: str, expand_copies: bool = True) -> SampleStore:
    """The split's samples, converting its shards on first use (see the module docstring).
    Safe to call from every rank at once: one converts under a file lock, the others wait and
    map the result."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)  # names the folder when prep has not finished
    if split not in manifest["splits"]:
        raise ShardError(f"{data_dir}: no split {split!r} (have {sorted(manifest['splits'])})")
    key = f"{split}-{sha256_file(data_dir / MANIFEST)[:16]}-v{STORE_VERSION}"
    root = _store_root(data_dir)
    folder = root / key
    with FileLock(str(root / f"{key}.lock")):
        if not (folder / "store.json").is_file():
            _convert(data_dir, manifest["splits"][split]["shards"], folder)
    return SampleStore(folder, expand_copies)


def _store_root(data_dir: Path) -> Path:
    """DATA/.store when DATA is writable, else a folder of the system's temporary directory
    named after DATA (a prep folder on a read-only share still trains)."""
    root = data_dir / ".store"
    try:
        root.mkdir(exist_ok=True)
        probe = root / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
        return root
    except OSError:
        name = str(data_dir.resolve()).strip("/").replace("/", "_")
        root = Path(tempfile.gettempdir()) / "hamburger-store" / name
        root.mkdir(parents=True, exist_ok=True)
        return root


def _convert(data_dir: Path, shards: list[dict], folder: Path) -> None:
    """Shards -> flat raw arrays (dtypes in _ARRAYS), streamed: one verified shard in memory at a
    time. Written under a temporary name and renamed, so a crash leaves no half store behind."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = _write_arrays(data_dir, shards, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "store.json").write_text(json.dumps(info))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _write_arrays(data_dir: Path, shards: list[dict], out: Path) -> dict:
    """Append each shard's columns to the flat files; returns the store's summary."""
    files = {name: open(out / f"{name}.bin", "wb") for name in _ARRAYS}
    tok_end = seg_end = 0
    files["token_offsets"].write(np.zeros(1, np.int64).tobytes())
    files["seg_offsets"].write(np.zeros(1, np.int64).tobytes())
    max_token, rows = -1, 0
    try:
        for info in shards:
            table = read_shard(data_dir, info)  # sha256 and row count checked, the file named
            ids = table.column("input_ids").combine_chunks()
            segs = table.column("seg_lens").combine_chunks()
            flat_ids = _flat(ids, np.int32)
            files["tokens"].write(flat_ids.tobytes())
            files["segs"].write(_flat(segs, np.int8).tobytes())
            files["token_offsets"].write((tok_end + _lengths(ids).cumsum()).tobytes())
            files["seg_offsets"].write((seg_end + _lengths(segs).cumsum()).tobytes())
            tok_end += len(flat_ids)
            seg_end += int(_lengths(segs).sum())
            for name in ("prompt_len", "sample_id", "copies"):
                col = table.column(name).to_numpy().astype(_ARRAYS[name])
                files[name].write(col.tobytes())
            if len(flat_ids):
                max_token = max(max_token, int(flat_ids.max()))
            rows += table.num_rows
    finally:
        for f in files.values():
            f.close()
        pa.default_memory_pool().release_unused()  # the shards' buffers, back to the OS
    return {"version": STORE_VERSION, "rows": rows, "tokens": tok_end, "max_token": max_token}


def _flat(arr: pa.ListArray, dtype) -> np.ndarray:
    """A list column's values as one numpy array (offsets honoured, so slices are exact)."""
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _lengths(arr: pa.ListArray) -> np.ndarray:
    return np.diff(arr.offsets.to_numpy()).astype(np.int64)


class _Flat:
    """A flat array on disk, read by range with pread: nothing is mapped into the process, so its
    resident memory does not grow as an epoch touches the whole file (a memory map would show
    every touched page of it, in 2 MiB folios, as the rank's own), and the OS page cache still
    serves repeated reads."""

    def __init__(self, path: Path, dtype):
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, start: int, stop: int) -> list[int]:
        size = self.dtype.itemsize
        raw = os.pread(self.fd, (int(stop) - int(start)) * size, int(start) * size)
        return np.frombuffer(raw, dtype=self.dtype).tolist()

    def __del__(self):
        if hasattr(self, "fd"):
            os.close(self.fd)
