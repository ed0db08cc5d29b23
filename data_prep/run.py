"""`./launch.sh prep CONFIG [key=value ...]`: sources -> labelled shards + manifest, on every rank.

Every rank scans the sources once (validating every row, keeping only a locator per row) and
derives the same plan; shard i is labelled by rank i % world_size, which re-reads only the rows
of its shards; rank 0 writes the manifest once all ranks are done. The output folder is
named by a hash of everything that shapes it, so a re-run reuses finished shards and a
changed setting can never pick up stale ones.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hamburger.assets import resolve_model
from hamburger.configio import load_config
from hamburger.dtypes import resolve_dtype
from hamburger.model.families import check_supported
from hamburger.model.folder_check import check_model_folder
from hamburger.refusal import exit_on

from .config import PrepConfig
from .fingerprint import DigestCache, fingerprint, vocab_fingerprint
from .label import Scorer, difficulty
from .manifest import GENERATOR, build_manifest, print_summary, shard_name
from .regenerate import Regenerator
from .shards import MANIFEST, SCHEMA_VERSION, atomic_write_text, finished_shard, load_manifest, write_shard
from .sources import Conversation, DataError, SourceIndex, index_source
from .strategies import segment
from .tokenize import ChatTokenizer, fit_length, special_token_pattern

FINGERPRINT_CACHE = "fingerprints.json"


# ---------------------------------------------------------------- distributed helpers
def dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def init_distributed(world: int) -> None:
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))


# ---------------------------------------------------------------- plan: mixture + held-out split
@dataclass
class PlanRow:
    conv: Conversation
    copies: int


@dataclass
class SplitPlan:
    """A split's rows in shard order, as (source, row index in the source, copies) arrays."""

    source: np.ndarray
    index: np.ndarray
    copies: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, sources: list[SourceIndex], start: int, stop: int) -> list[PlanRow]:
        """Rows start..stop read back from their files: only the rows a rank labels are loaded."""
        return [
            PlanRow(sources[s].conversation(int(i)), int(c))
            for s, i, c in zip(
                self.source[start:stop], self.index[start:stop], self.copies[start:stop], strict=True
            )
        ]


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the parts (row identity, seed)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_plan(sources: list[SourceIndex], cfg: PrepConfig) -> dict[str, SplitPlan]:
    """Held-out rows by hash of (seed, source name, file name, row); weights as repeats (train only) and
    deterministic subsampling (both splits); then a seeded shuffle, so that every shard mixes
    sources and ranks get similar work."""
    cols = {split: (array("h"), array("q"), array("h")) for split in ("train", "eval")}
    for s, (src, scfg) in enumerate(zip(sources, cfg.sources, strict=True)):
        w = scfg.weight
        whole, frac = int(w), w - int(w)
        for i in range(len(src)):
            # The file's name, not its path: the same file in another folder gets the same split.
            ident = (cfg.seed, src.name, Path(src.file(i)).name, int(src.row[i]))
            held = _unit("heldout", *ident) < cfg.heldout_fraction
            extra = 1 if _unit("weight", *ident) < frac else 0
            if whole + extra == 0:
                src.skipped["subsampled"] += 1
                continue
            for col, value in zip(
                cols["eval" if held else "train"], (s, i, 1 if held else whole + extra), strict=True
            ):
                col.append(value)
    plan = {}
    for split, (source, index, copies) in cols.items():  # mix sources across shards: ranks get even work
        order = list(range(len(index)))
        random.Random(f"{cfg.seed}|{split}").shuffle(order)
        perm = np.asarray(order, dtype=np.int64)
        plan[split] = SplitPlan(
            np.frombuffer(source, np.int16)[perm],
            np.frombuffer(index, np.int64)[perm],
            np.frombuffer(copies, np.int16)[perm],
        )
    check_plan(plan, sources, cfg)
    return plan


def check_plan(plan: dict[str, SplitPlan], sources: list[SourceIndex], cfg: PrepConfig) -> None:
    """A prep that training cannot use is an error here, not at training time."""
    for src, scfg in zip(sources, cfg.sources, strict=True):
        if len(src) == 0:
            raise DataError(
                f"source {src.name!r} ({scfg.path or scfg.hf_name}): no usable rows "
                f"({src.rows_read} read, skipped {dict(src.skipped)})"
            )
    total = len(plan["train"]) + len(plan["eval"])
    if len(plan["eval"]) == 0:
        raise ValueError(
            f"heldout_fraction={cfg.heldout_fraction} held out none of the {total} rows: training "
            "evaluates on the held-out split; raise heldout_fraction"
        )
    if len(plan["train"]) == 0:
        raise ValueError(
            f"heldout_fraction={cfg.heldout_fraction} held out all {total} rows: nothing left to train on"
        )


# ---------------------------------------------------------------- cache key
def cache_key(
    cfg: PrepConfig,
    sources: list[SourceIndex],
    template: str,
    model_path: str,
    tok_path: str,
    digests: DigestCache,
) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "plan": "mixed-shards-v4",
        "strategy_rules": 2,  # 2: decreasing / sliding / small_group as in the reference
        "model": cfg.model,
        "model_fingerprint": fingerprint(model_path, digests),
        "tokenizer": cfg.tokenizer or cfg.model,
        "tokenizer_fingerprint": fingerprint(tok_path, digests),
        "chat_template": template,
        "label": asdict(cfg.label),
        "max_len": cfg.max_len,
        "overlong": cfg.overlong,
        "bad_rows": cfg.bad_rows,
        "heldout_fraction": cfg.heldout_fraction,
        "seed": cfg.seed,
        "shard_rows": cfg.shard_rows,
        "keep_values": cfg.keep_values,
        **generation_key(cfg),
        "sources": [
            {"config": asdict(s), "content_hash": r.content_hash}
            for s, r in zip(cfg.sources, sources, strict=True)
        ],
    }


def generation_key(cfg: PrepConfig) -> dict:
    """Self-distillation's part of the key: every generation setting, and the decoder that
    wrote the tokens. Empty when responses come from the sources, so that the keys (and the
    prepared folders) of runs without it stay what they were."""
    if cfg.responses == "source":
        return {}
    generate = asdict(cfg.generate)
    if generate["decode"] == "eager":  # the keys of runs from before the setting stay what they were
        del generate["decode"]
    return {"responses": cfg.responses, "generate": generate, "generator": GENERATOR}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- one shard
def prompts_to_answer(
    rows: list[PlanRow], chat: ChatTokenizer, max_len: int
) -> tuple[list[list[int]], list[int]]:
    """The rows' prompts, and the indices of those short enough to answer (the others are
    skipped as prompt_too_long)."""
    prompts = [chat.prompt(row.conv) for row in rows]
    return prompts, [i for i, p in enumerate(prompts) if len(p) < max_len]


def encode_rows(
    rows: list[PlanRow],
    chat: ChatTokenizer,
    max_len: int,
    regen: Regenerator | None,
    shard: str,
    stats: dict,
    upcoming: tuple[str, list[list[int]]] | None = None,
) -> list[tuple[list[int], int] | str]:
    """Per row: (token ids, prompt length), or the reason it is skipped. With a Regenerator the
    response is the base model's own output for the prompt (its exact tokens, never re-tokenised
    text), and stats["generation"] counts prompts, generated tokens and cuts per source.
    upcoming: the next shard's (name, prompts to answer), which the Regenerator may start."""
    if regen is None:
        return [chat.encode(row.conv) for row in rows]
    prompts, fits = prompts_to_answer(rows, chat, max_len)
    seconds = regen.seconds
    made = regen.responses([prompts[i] for i in fits], shard, upcoming)
    stats["generation"] = {"seconds": regen.seconds - seconds, "per_source": {}}
    out: list[tuple[list[int], int] | str] = [(p, len(p)) for p in prompts]
    per_source = stats["generation"]["per_source"]
    for i, g in zip(fits, made, strict=True):
        src = per_source.setdefault(
            rows[i].conv.source, {"prompts": 0, "tokens_generated": 0, "cut_at_limit": 0}
        )
        src["prompts"] += 1
        src["tokens_generated"] += len(g.tokens)
        src["cut_at_limit"] += int(g.cut)
        out[i] = (
            "cut_at_limit"
            if g.cut and regen.cfg.at_limit == "skip"
            else (prompts[i] + g.tokens, len(prompts[i]))
        )
    return out


def label_shard(
    rows: list[PlanRow],
    first_id: int,
    chat: ChatTokenizer,
    scorer: Scorer,
    cfg: PrepConfig,
    regen: Regenerator | None = None,
    shard: str = "",
    upcoming: tuple[str, list[list[int]]] | None = None,
):
    """(Regenerate responses,) tokenise, fit to max_len, score, segment. Returns (columns, stats)."""
    k = cfg.label.max_segment_len
    stats: dict = {
        "rows_in": len(rows),
        "skipped": Counter(),
        "truncated": 0,
        "effective_rows": 0,
        "response_tokens": 0,
        "segments": 0,
        "histogram": Counter(),
        "per_source": {},
    }
    kept: list[tuple[int, PlanRow, list[int], int]] = []
    for i, (row, encoded) in enumerate(
        zip(rows, encode_rows(rows, chat, cfg.max_len, regen, shard, stats, upcoming), strict=True)
    ):
        if isinstance(encoded, str):
            stats["skipped"][encoded] += 1
            continue
        ids, p = encoded
        fitted = fit_length(ids, p, cfg.max_len, cfg.overlong)
        if isinstance(fitted, str):
            stats["skipped"][fitted] += 1
            continue
        stats["truncated"] += int(fitted.truncated)
        kept.append((first_id + i, row, fitted.input_ids, fitted.prompt_len))
    scores = scorer.score([(ids, p) for _, _, ids, p in kept], cfg.label.batch_tokens)
    cols: dict[str, list] = {
        name: []
        for name in (
            "sample_id",
            "source",
            "origin",
            "copies",
            "input_ids",
            "prompt_len",
            "seg_lens",
            "values",
            "meta",
        )
    }
    for (sid, row, ids, p), sc in zip(kept, scores, strict=True):
        values = difficulty(sc, cfg.label.metric)
        segs = segment(values, cfg.label, scorer.model.config.vocab_size)
        assert sum(segs) == len(ids) - p and max(segs) <= k, "strategy broke its contract"
        cols["sample_id"].append(sid)
        cols["source"].append(row.conv.source)
        cols["origin"].append(f"{row.conv.file}:{row.conv.row}")
        cols["copies"].append(row.copies)
        cols["input_ids"].append(ids)
        cols["prompt_len"].append(p)
        cols["seg_lens"].append(segs)
        cols["values"].append(values.astype(np.float16).tolist() if cfg.keep_values else [])
        cols["meta"].append(json.dumps(row.conv.meta))
        src = stats["per_source"].setdefault(
            row.conv.source, {"rows": 0, "response_tokens": 0, "segments": 0}
        )
        src["rows"] += 1
        stats["effective_rows"] += row.copies
        src["response_tokens"] += len(ids) - p
        src["segments"] += len(segs)
        stats["response_tokens"] += len(ids) - p
        stats["segments"] += len(segs)
        stats["histogram"].update(segs)
    stats["skipped"] = dict(stats["skipped"])
    stats["histogram"] = {str(n): c for n, c in sorted(stats["histogram"].items())}
    return cols, stats


# ---------------------------------------------------------------- the run
def prepare(cfg: PrepConfig, on_shard_done=None) -> Path:
    """Run (or finish, or reuse) data prep for cfg; returns the output folder on every rank."""
    rank, world, local_rank = dist_info()
    init_distributed(world)
    digests = DigestCache(Path(cfg.output_root) / FINGERPRINT_CACHE)
    if rank == 0:  # converts the embedded model and hashes its weights once; the others reuse both
        fingerprint(resolve_model(cfg.model), digests)
        fingerprint(resolve_model(cfg.tokenizer or cfg.model), digests)
    barrier()
    model_path, tok_path = resolve_model(cfg.model), resolve_model(cfg.tokenizer or cfg.model)
    digests = DigestCache(Path(cfg.output_root) / FINGERPRINT_CACHE)  # read what rank 0 wrote

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_folder(model_path, tokenizer=False)
    check_supported(AutoConfig.from_pretrained(model_path))  # labelling reads its LM head directly
    check_model_folder(tok_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    chat = ChatTokenizer(tokenizer, cfg.chat_template, name=tok_path)
    special = special_token_pattern(tokenizer)
    sources = [index_source(s, cfg.bad_rows, special) for s in cfg.sources]
    key = cache_key(cfg, sources, chat.template, model_path, tok_path, digests)
    digest = key_hash(key)
    folder = Path(cfg.output_root) / digest[:16]
    if (folder / MANIFEST).is_file():
        manifest = load_manifest(folder)
        if manifest.get("key_hash") == digest:
            _log(rank, f"[prep] reusing {folder} (same cache key)")
            return folder
    folder.mkdir(parents=True, exist_ok=True)

    plan = make_plan(sources, cfg)
    work = shard_work(plan, cfg)
    mine = [w for i, w in enumerate(work) if i % world == rank]
    todo = [w for w in mine if finished_shard(folder, shard_name(w[0], w[1], cfg)) is None]
    _log(rank, f"[prep] {folder}: {len(work)} shards, {len(mine)} on rank {rank}, {len(todo)} to do")
    if todo:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(cfg.label.dtype, device)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scorer = Scorer(model, device, pad_id=pad)
        regen = Regenerator(model, cfg.generate, chat.eos, pad) if cfg.responses == "regenerate" else None
        t0 = time.perf_counter()
        for i, (split, start, stop) in enumerate(
            tqdm(todo, desc=f"labelling (rank {rank})", disable=rank != 0, unit="shard")
        ):
            rows = plan[split].rows(sources, start, stop)
            name = shard_name(split, start, cfg)
            upcoming = None
            if regen is not None and i + 1 < len(todo):  # its prompts may start while this shard ends
                nsplit, nstart, nstop = todo[i + 1]
                nprompts, nfits = prompts_to_answer(
                    plan[nsplit].rows(sources, nstart, nstop), chat, cfg.max_len
                )
                upcoming = (shard_name(nsplit, nstart, cfg), [nprompts[j] for j in nfits])
            cols, stats = label_shard(rows, start, chat, scorer, cfg, regen, name, upcoming)
            stats["scored_tokens"] = scorer.stats.real_tokens
            write_shard(folder, name, cols, stats)
            if on_shard_done is not None:
                on_shard_done(split, start)
        pad_share = 1 - scorer.stats.real_tokens / max(scorer.stats.padded_tokens, 1)
        _log(
            rank,
            f"[prep] rank {rank}: {scorer.stats.real_tokens} tokens scored in "
            f"{time.perf_counter() - t0:.1f}s, padding {pad_share:.1%}",
        )
        if regen is not None:
            _log(
                rank,
                f"[prep] rank {rank}: {regen.tokens} response tokens generated in {regen.seconds:.1f}s "
                f"({regen.tokens / max(regen.seconds, 1e-9):.1f} tokens/s)",
            )
    barrier()
    if rank == 0:
        manifest = build_manifest(folder, work, sources, key, digest, cfg)
        manifest["tokenizer_check"] = vocab_fingerprint(tokenizer)
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
        print_summary(folder, manifest)
    barrier()
    return folder


def shard_work(plan: dict[str, SplitPlan], cfg: PrepConfig) -> list[tuple[str, int, int]]:
    """(split, start, stop) of every shard, in the order ranks take them round-robin."""
    return [
        (split, j, min(j + cfg.shard_rows, len(rows)))
        for split, rows in plan.items()
        for j in range(0, len(rows), cfg.shard_rows)
    ]


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def main(argv: list[str] | None = None) -> Path:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or "=" in args[0]:
        raise SystemExit("usage: ./launch.sh prep CONFIG.yaml [key=value ...]")
    try:
        cfg = load_config(PrepConfig, args[0], args[1:])
        folder = prepare(cfg)
    except Exception as e:  # noqa: BLE001 - a refusal is one message, once; a fault its traceback
        exit_on("prep", e)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return folder


if __name__ == "__main__":
    main()
