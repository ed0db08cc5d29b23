"""The prep folder's manifest: per-split, per-source and overall totals of the finished shards.

Rank 0 assembles it once every rank has written its shards, from the shards' own stats (so a
resumed prep counts reused shards the same as new ones), and prints its summary. Shard names
live here because both the labelling loop (which writes shards) and the manifest (which reads
them back) must agree on them; GENERATOR, because it is recorded both in the cache key and in
the manifest's generation summary.
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .config import PrepConfig
from .shards import MANIFEST, SCHEMA_VERSION, finished_shard
from .sources import SourceIndex

GENERATOR = "continuous-v2"  # bump when the decoder's output for the same settings changes


def shard_name(split: str, start: int, cfg: PrepConfig) -> str:
    return f"{split}-{start // cfg.shard_rows:05d}"


def _distinct_rows(s: SourceIndex) -> int:
    """Source rows behind the index's entries (a conversation gives one entry per turn)."""
    import numpy as np

    return int(np.unique((s.file_idx.astype(np.int64) << 40) | s.row).size)


def build_manifest(
    folder: Path, work, sources: list[SourceIndex], key: dict, digest: str, cfg: PrepConfig
) -> dict:
    k = cfg.label.max_segment_len
    splits: dict = {}
    per_source: dict = {
        s.name: {
            "rows_read": s.rows_read,
            "turns": len(s),  # rows to learn after checks: one per assistant turn of a conversation
            "conversations": _distinct_rows(s),
            "skipped": dict(s.skipped),
            "skip_examples": s.skip_examples,
            "content_hash": s.content_hash,
            "rows_out": 0,
            "response_tokens": 0,
            "segments": 0,
        }
        for s in sources
    }
    hist: Counter = Counter()
    skipped: Counter = Counter()
    generation = GenerationTally() if cfg.responses == "regenerate" else None
    for s in sources:
        skipped.update(s.skipped)
    for split, start, _stop in work:
        info = finished_shard(folder, shard_name(split, start, cfg))
        if info is None:
            raise RuntimeError(
                f"{folder}: shard {shard_name(split, start, cfg)} missing after all ranks finished"
            )
        entry = splits.setdefault(
            split,
            {
                "rows": 0,
                "effective_rows": 0,
                "response_tokens": 0,
                "segments": 0,
                "truncated": 0,
                "shards": [],
            },
        )
        st = info.stats
        entry["rows"] += info.rows
        entry["response_tokens"] += st["response_tokens"]
        entry["segments"] += st["segments"]
        entry["truncated"] += st["truncated"]
        entry["effective_rows"] += st["effective_rows"]
        entry["shards"].append({"file": info.file, "rows": info.rows, "sha256": info.sha256})
        skipped.update(st["skipped"])
        hist.update({int(n): c for n, c in st["histogram"].items()})
        if generation is not None:
            generation.add(st["generation"])
        for name, ps in st["per_source"].items():
            for f in ("response_tokens", "segments"):
                per_source[name][f] += ps[f]
            per_source[name]["rows_out"] += ps["rows"]
    for split in ("train", "eval"):
        if splits.get(split, {}).get("rows", 0) == 0:
            raise ValueError(
                f"{folder}: the {split} split has no rows after tokenisation (skipped: {dict(skipped)}); "
                f"training needs both splits: raise heldout_fraction={cfg.heldout_fraction} or max_len={cfg.max_len}, "
                "or set overlong=truncate"
            )
    for entry in splits.values():
        entry["compression"] = entry["response_tokens"] / max(entry["segments"], 1)
    for ps in per_source.values():
        ps["compression"] = ps["response_tokens"] / max(ps["segments"], 1)
    total_tokens = sum(e["response_tokens"] for e in splits.values())
    total_segments = sum(e["segments"] for e in splits.values())
    extra = {}
    if generation is not None:
        for name, ps in per_source.items():
            ps["generation"] = generation.source(name)
        extra["generation"] = generation.summary(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "key_hash": digest,
        "key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows_in": sum(ps["rows_read"] for ps in per_source.values()),
        "turns_learned": sum(ps["turns"] for ps in per_source.values()),
        "rows_out": sum(e["rows"] for e in splits.values()),
        "skipped": dict(skipped),
        "response_tokens": total_tokens,
        "segments": total_segments,
        "compression": total_tokens / max(total_segments, 1),
        "compression_definition": "response tokens / segments: the best-case tokens per macro step",
        "segment_histogram": {str(n): hist.get(n, 0) for n in range(1, k + 1)},
        "sources": per_source,
        "splits": splits,
        **extra,
    }


class GenerationTally:
    """Sums the shards' generation stats into the manifest's per-source and overall numbers."""

    def __init__(self):
        self.seconds = 0.0
        self.per_source: dict[str, Counter] = {}

    def add(self, shard_stats: dict) -> None:
        self.seconds += shard_stats["seconds"]
        for name, counts in shard_stats["per_source"].items():
            self.per_source.setdefault(name, Counter()).update(counts)

    @staticmethod
    def _rates(c: Counter) -> dict:
        prompts = c["prompts"]
        return {
            "prompts": prompts,
            "tokens_generated": c["tokens_generated"],
            "cut_at_limit": c["cut_at_limit"],
            "cut_share": c["cut_at_limit"] / max(prompts, 1),
            "mean_response_tokens": c["tokens_generated"] / max(prompts, 1),
        }

    def source(self, name: str) -> dict:
        return self._rates(self.per_source.get(name, Counter()))

    def summary(self, cfg: PrepConfig) -> dict:
        total: Counter = Counter()
        for c in self.per_source.values():
            total.update(c)
        return {
            "settings": asdict(cfg.generate),
            "generator": GENERATOR,
            **self._rates(total),
            "seconds": self.seconds,
            "tokens_per_second": total["tokens_generated"] / max(self.seconds, 1e-9),
            "definition": "responses written by the base model (self-distillation); cut_share: "
            "share of prompts whose response reached max_new_tokens without EOS; seconds summed over shards",
        }


def print_summary(folder: Path, m: dict) -> None:
    print(f"[prep] wrote {folder}")
    print(f"[prep] rows in {m['rows_in']}, out {m['rows_out']}, skipped {m['skipped'] or 0}")
    if m.get("turns_learned", m["rows_in"]) != m["rows_in"]:
        print(f"[prep] conversations: {m['turns_learned']} assistant turns learned, each its own row")
    for split, e in m["splits"].items():
        print(
            f"[prep]   {split}: {e['rows']} rows, {e['response_tokens']} response tokens, "
            f"compression {e['compression']:.3f} tokens/segment"
        )
    if "generation" in m:
        g = m["generation"]
        print(
            f"[prep] responses written by the base: {g['prompts']} prompts, {g['tokens_generated']} tokens "
            f"({g['tokens_per_second']:.1f} tokens/s), {g['cut_at_limit']} ({g['cut_share']:.1%}) cut at "
            f"max_new_tokens={g['settings']['max_new_tokens']}"
        )
    for name, s in m["sources"].items():
        gen = s.get("generation")
        cut = f", {gen['cut_share']:.0%} cut at the limit" if gen else ""
        print(f"[prep]   source {name}: {s['rows_out']} rows, compression {s['compression']:.3f}{cut}")
        for example in s["skip_examples"][:3]:  # skipped rows are reported, never silent
            print(f"[prep]     skipped: {example}")
        if len(s["skip_examples"]) > 3:
            print(f"[prep]     ... {len(s['skip_examples']) - 3} more examples in {folder / MANIFEST}")
    print(
        f"[prep] segment lengths: {m['segment_histogram']}; compression {m['compression']:.3f} "
        f"({m['compression_definition']})"
    )
