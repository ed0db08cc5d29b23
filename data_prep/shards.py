"""The shard schema: the one thing data_prep and the trainer share.

A shard is a Parquet file written atomically (temporary name, then rename) with a `.done.json`
marker beside it holding its row count and sha256. A shard without a valid marker does not
exist; a shard whose bytes no longer match its marker is reported as corrupt on read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hamburger.io import atomic_write_text, sha256_file  # noqa: F401 - re-exported for data_prep

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),  # unique within the split, stable across runs with the same key
        ("source", pa.string()),
        ("origin", pa.string()),  # "file:row" of the raw record
        ("copies", pa.int16()),  # per-source weight: how many times training sees this row
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("seg_lens", pa.list_(pa.int8())),
        ("values", pa.list_(pa.float16())),  # per response token metric (empty unless kept)
        ("meta", pa.string()),  # JSON: e.g. task_id and tests for code tasks
    ]
)


class ShardError(RuntimeError):
    """A shard or manifest is missing, incomplete or corrupt; the message names the file."""


@dataclass
class ShardInfo:
    file: str
    rows: int
    sha256: str
    stats: dict

    def to_dict(self) -> dict:
        return {"file": self.file, "rows": self.rows, "sha256": self.sha256, "stats": self.stats}


def write_shard(folder: Path, name: str, rows: dict[str, list], stats: dict) -> ShardInfo:
    """Write rows (column lists) as folder/name.parquet plus its marker, atomically."""
    path = folder / f"{name}.parquet"
    tmp = folder / f"{name}.parquet.tmp{os.getpid()}"
    table = pa.table(rows, schema=SCHEMA)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    info = ShardInfo(file=path.name, rows=table.num_rows, sha256=sha256_file(path), stats=stats)
    atomic_write_text(folder / f"{name}.done.json", json.dumps(info.to_dict(), indent=1))
    return info


def finished_shard(folder: Path, name: str) -> ShardInfo | None:
    """The shard's info if its marker is present and its bytes match; None means 'do it again'."""
    marker, path = folder / f"{name}.done.json", folder / f"{name}.parquet"
    if not marker.is_file() or not path.is_file():
        return None
    try:
        info = ShardInfo(**json.loads(marker.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    return info if sha256_file(path) == info.sha256 else None


def read_shard(folder: Path, info: dict, verify: bool = True) -> pa.Table:
    path = Path(folder) / info["file"]
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    if verify and sha256_file(path) != info["sha256"]:
        raise ShardError(f"{path}: corrupt shard (sha256 differs from the manifest); re-run data prep")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{path}: unreadable shard ({e})") from None
    if table.num_rows != info["rows"]:
        raise ShardError(f"{path}: {table.num_rows} rows, the manifest says {info['rows']}")
    return table


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; data prep did not finish for this folder (re-run it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}"
        )
    label = manifest.get("key", {}).get("label", {})
    if "max_steps" in label and "max_segment_len" not in label:  # written before K was renamed
        label["max_segment_len"] = label.pop("max_steps")
    return manifest


def read_split(folder: str | Path, split: str, verify: bool = True) -> pa.Table:
    """Every row of a split (train or eval) in sample_id order, each shard checked."""
    manifest = load_manifest(folder)
    if split not in manifest["splits"]:
        raise ShardError(f"{folder}: no split {split!r} (have {sorted(manifest['splits'])})")
    tables = [read_shard(Path(folder), s, verify) for s in manifest["splits"][split]["shards"]]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)
