"""Reading the shipped self-distilled corpus (`builtin:smollm2_distilled`); data_prep/distilled.py
writes it. Apart so that sources.py can read it without importing the export's dependencies."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from .records import DataError

__all__ = ["ASSET", "FORMAT", "builtin_records", "read_asset"]

ASSET = Path(__file__).resolve().parent / "assets" / "smollm2_distilled.jsonl.gz"
FORMAT = "hamburger-distilled-v1"


# ---------------------------------------------------------------- reading the shipped file
def read_asset(path: str | Path = ASSET) -> tuple[dict, list[dict]]:
    """(header, records) of a distilled corpus file; a bad file raises naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the distilled corpus is missing (python -m data_prep.distilled export)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty file: no header")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path}: line 1: not a {FORMAT} header")
    records = []
    for no, line in enumerate(lines[1:], 2):
        rec = json.loads(line)
        missing = [k for k in ("source", "file", "row", "prompt", "response", "response_ids") if k not in rec]
        if missing:
            raise DataError(f"{path}: line {no}: missing field(s) {missing}")
        records.append(rec)
    if len(records) != header.get("records"):
        raise DataError(f"{path}: {len(records)} records, the header says {header.get('records')}")
    return header, records


def builtin_records(path: str | Path = ASSET) -> tuple[list[tuple[str, int, dict]], str]:
    """`builtin:smollm2_distilled`: (file, row, record) triples in the builtin corpora's shape
    (instruction/output), keeping the original file and row (so origins name the first source),
    the original source's name in field `source` and `cut` (filters can select by either: a
    source response always ends with EOS, so a cut one would teach stopping where the base
    did not stop)."""
    out = []
    header, records = read_asset(path)
    for rec in records:
        fields = {
            "instruction": rec["prompt"],
            "output": rec["response"],
            "source": rec["source"],
            "cut": rec["cut"],
        }
        # the exact generated tokens (used with the same vocabulary; see tokenize.ChatTokenizer)
        exact = {
            "ids": rec["response_ids"],
            "vocab_sha256": header["vocab_sha256"],
            "complete": not rec["cut"],
        }
        out.append((rec["file"], rec["row"], {**fields, "_meta": rec.get("meta") or {}, "_response": exact}))
    return out, hashlib.sha256(Path(path).read_bytes()).hexdigest()
