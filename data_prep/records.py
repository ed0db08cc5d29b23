"""Record files: read a data file row by row, and fetch one row again later by its locator.

Prep scans every source once to validate rows and plan the shards, but a rank keeps only a
small locator per row (a byte offset, or a row index into a memory-mapped table), and re-reads
the rows it labels when it labels them. So a rank's memory does not grow with the corpus.

`scan()` yields (row, locator, record or DataError): a malformed row is yielded as an error
that names file, line/row and what is wrong, so the caller can stop or count-and-skip it.
Row numbers are 1-based lines for JSONL/CSV and 0-based indices otherwise.

Plain .jsonl/.csv files are re-read by byte offset, .parquet/.arrow through an Arrow table
(memory-mapped for .arrow), Hugging Face datasets through their memory-mapped Arrow cache.
Gzipped files and .json lists cannot be re-read cheaply by position: their records are kept
in memory (use .jsonl, .csv, .parquet or .arrow for corpora of millions of rows).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import IO

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


class DataError(ValueError):
    """Malformed input; the message names file, row and field. `reason` is the skip counter."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


BOM = b"\xef\xbb\xbf"
Opener = Callable[..., IO[bytes]]
Scanned = tuple[int, int, object]  # (row, locator, record dict or DataError)


class RecordFile(ABC):
    """One file (or dataset) of records: scan all, then fetch any by its locator."""

    label: str  # the name used in messages and in shard origins

    @abstractmethod
    def scan(self) -> Iterator[Scanned]:
        """Every record in order: (row, locator, record dict or the row's DataError)."""

    @abstractmethod
    def get(self, locator: int) -> dict:
        """The record a scan yielded with this locator (a usable row: it parsed before)."""


class MemoryRecords(RecordFile):
    """Records already in memory (embedded corpora, .json lists, gzipped files)."""

    def __init__(self, label: str, rows: list[tuple[int, object]]):
        self.label = label
        self.rows = rows

    def scan(self) -> Iterator[Scanned]:
        for i, (row, rec) in enumerate(self.rows):
            yield row, i, rec

    def get(self, locator: int) -> dict:
        return self.rows[locator][1]  # type: ignore[return-value]


def _decode(raw: bytes, path: str, line_no: int) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"{path}: line {line_no}: not valid UTF-8 (byte {e.start} of the line)")


def _json_line(raw: bytes, path: str, line_no: int) -> object:
    text = _decode(raw, path, line_no)
    if isinstance(text, DataError):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"{path}: line {line_no}: invalid JSON ({e.msg} at column {e.colno})")


class JsonlFile(RecordFile):
    """JSON Lines; blank lines are ignored. Located by byte offset."""

    def __init__(self, path: str, opener: Opener = open):
        self.label = path
        self.opener = opener
        self._f: IO[bytes] | None = None

    def scan(self) -> Iterator[Scanned]:
        offset = 0
        with self.opener(self.label, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if line_no == 1 and raw.startswith(BOM):  # a UTF-8 byte-order mark is not data
                    raw, start = raw[len(BOM) :], start + len(BOM)
                if raw.strip():
                    yield line_no, start, _json_line(raw, self.label, line_no)

    def get(self, locator: int) -> dict:
        if self._f is None:
            self._f = open(self.label, "rb")  # noqa: SIM115 (kept open: many rows are fetched)
        self._f.seek(locator)
        return json.loads(self._f.readline())


class CsvFile(RecordFile):
    """CSV with a header line; every record must have as many fields as the header. Located by
    the byte offset of the record's first line (a quoted field may span lines)."""

    def __init__(self, path: str, opener: Opener = open):
        self.label = path
        self.opener = opener
        self.header: list[str] = []
        self._f: IO[bytes] | None = None

    def scan(self) -> Iterator[Scanned]:
        state = {"pos": 0, "line": 0, "bad": None}

        def lines(f: IO[bytes]) -> Iterator[str]:
            for raw in f:
                state["pos"] += len(raw)
                state["line"] += 1
                text = _decode(raw, self.label, state["line"])
                if isinstance(text, DataError):
                    state["bad"] = state["bad"] or text
                    text = raw.decode("utf-8", errors="replace")
                yield text

        with self.opener(self.label, "rb") as f:
            reader = csv.reader(lines(f))
            try:
                self.header = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{self.label}: line 1: unreadable CSV header ({e})") from None
            if state["bad"]:
                raise state["bad"]
            if self.header:
                self.header[0] = self.header[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark
            while True:
                start, start_line = state["pos"], state["line"] + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield (
                        start_line,
                        start,
                        DataError(f"{self.label}: line {start_line}: unreadable CSV ({e})"),
                    )
                    continue
                if state["bad"]:
                    bad, state["bad"] = state["bad"], None
                    yield start_line, start, bad
                elif fields:  # csv yields [] for a blank line
                    yield start_line, start, self._record(fields, start_line)

    def _record(self, fields: list[str], line_no: int) -> dict | DataError:
        if len(fields) != len(self.header):
            return DataError(
                f"{self.label}: line {line_no}: {len(fields)} fields, the header has "
                f"{len(self.header)} ({', '.join(self.header)})"
            )
        return dict(zip(self.header, fields, strict=True))

    def get(self, locator: int) -> dict:
        if self._f is None:
            self._f = open(self.label, "rb")  # noqa: SIM115 (kept open: many rows are fetched)
        self._f.seek(locator)
        fields = next(csv.reader(raw.decode("utf-8") for raw in self._f))
        return dict(zip(self.header, fields, strict=True))


class TableFile(RecordFile):
    """Parquet (read into Arrow memory: columnar, not Python objects) or Arrow IPC (memory-mapped)."""

    def __init__(self, path: str, fmt: str):
        self.label = path
        self.table = read_table(path, fmt)

    def scan(self) -> Iterator[Scanned]:
        row = 0
        for batch in self.table.to_batches(max_chunksize=4096):
            for rec in batch.to_pylist():
                yield row, row, rec
                row += 1

    def get(self, locator: int) -> dict:
        return self.table.slice(locator, 1).to_pylist()[0]


class DatasetRecords(RecordFile):
    """A Hugging Face dataset (memory-mapped Arrow), located by row index."""

    def __init__(self, label: str, dataset):
        self.label = label
        self.dataset = dataset

    def scan(self) -> Iterator[Scanned]:
        for i, rec in enumerate(self.dataset):
            yield i, i, rec

    def get(self, locator: int) -> dict:
        return self.dataset[int(locator)]


def read_table(path: str, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path)
        source = pa.memory_map(path)
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: unreadable or corrupt {fmt} file ({e})") from None


def _gz_rows(path: str, fmt: str) -> list[tuple[int, object]]:
    """Every record of a gzipped JSONL/CSV file, scanned like the plain file, kept in memory."""
    reader = JsonlFile(path, gzip.open) if fmt == "jsonl" else CsvFile(path, gzip.open)
    return [(row, rec) for row, _, rec in reader.scan()]


def _json_list(path: str) -> list[tuple[int, object]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (a .json list is read whole)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON source must hold a list of records, got {type(data).__name__}")
    return list(enumerate(data))


def suffix(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(p)[1].lower()


def open_records(path: str, fmt: str = "auto") -> RecordFile:
    """The reader for one file."""
    fmt = SUFFIX_FORMATS.get(suffix(path), "") if fmt == "auto" else fmt
    if not fmt:
        raise DataError(f"{path}: cannot tell the format from the file name; set the source's format")
    try:
        if fmt in ("jsonl", "csv") and path.endswith(".gz"):
            return MemoryRecords(path, _gz_rows(path, fmt))
        if fmt == "jsonl":
            return JsonlFile(path)
        if fmt == "csv":
            return CsvFile(path)
        if fmt == "json":
            return MemoryRecords(path, _json_list(path))
        if fmt in ("parquet", "arrow"):
            return TableFile(path, fmt)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    raise DataError(f"{path}: unknown format {fmt!r}")


def field_of(rec: dict, key: str, where: str):
    """rec[key], or a DataError naming the row and the fields it has."""
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(map(str, rec))[:10]})")
    return rec[key]
