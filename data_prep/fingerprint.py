"""Fingerprints of the scoring model and tokenizer, for prep's cache key.

A model folder is named by the *content* of its files: new weights of the same shape must give
new labels, so a weight file's size (or name) is not enough. Hashing a multi-GiB weight file
takes seconds, so each file's sha256 is remembered in a small JSON cache keyed by its path,
size, modification time and inode; a file that changes in any of these is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .shards import atomic_write_text, sha256_file

TEXT_SUFFIXES = (".json", ".txt", ".model", ".jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


class DigestCache:
    """sha256 of files, remembered across runs in a JSON file (None: remembered in memory only)."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.hashed = 0  # files actually read by this instance (tests check the cache works)
        self.entries: dict[str, str] = {}
        if cache_file is not None and cache_file.is_file():
            try:
                self.entries = dict(json.loads(cache_file.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError):
                self.entries = {}  # a damaged cache only costs a re-hash

    def digest(self, path: Path) -> str:
        key = _stat_key(path)
        if key not in self.entries:
            self.entries[key] = sha256_file(path)
            self.hashed += 1
            self._save()
        return self.entries[key]

    def _save(self) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        live = {k: v for k, v in self.entries.items() if os.path.exists(k.split("|", 1)[0])}
        atomic_write_text(self.cache_file, json.dumps(live, indent=0, sort_keys=True))


def fingerprint(path: str, cache: DigestCache) -> str:
    """A local model/tokenizer folder by the content of its config, tokenizer and weight files;
    a hub name (not a folder) by its name."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.suffix in TEXT_SUFFIXES:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{cache.digest(f)}".encode())
    return h.hexdigest()


def vocab_fingerprint(tokenizer) -> dict:
    """What a trained model's tokenizer must match for these shards to mean the same tokens:
    the sha256 of its vocabulary (token -> id) and its special ids. Unlike the folder
    fingerprint this ignores the weights, so the trainer can compare it with any model's
    tokenizer (a fine-tuned model keeps its base's vocabulary)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    return {
        "vocab_sha256": h.hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
