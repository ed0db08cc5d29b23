"""Labelled compression of self-distilled responses, per source.

The embedded SmolLM2-135M-Instruct writes its own greedy responses to a sample of each offline
prompt source through data_prep (`responses: regenerate`), which then labels them with
decreasing_v2; the same rows with their reference responses (`responses: source`) are labelled
beside them. Then the labelling thresholds (ratio, min_threshold) are swept over the stored
per-token entropies of the self-distilled responses, with a proxy of their quality cost: the
mean base entropy (nats) of the tokens that join a segment, i.e. the uncertainty the micro
decoder must resolve without a base forward pass (0 would be free; higher risks more errors).
    python bench/bench_distill.py [--prompts 24] [--max-new-tokens 128] [--batch-size 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from data_prep.config import GenerateConfig, LabelConfig, PrepConfig, SourceConfig  # noqa: E402
from data_prep.run import prepare  # noqa: E402
from data_prep.shards import load_manifest, read_split  # noqa: E402
from data_prep.sources import load_source, source_name  # noqa: E402
from data_prep.strategies import segment  # noqa: E402
from hamburger.configio import load_config  # noqa: E402

SOURCES = ("chatterbot", "humaneval", "stdlib")
GRID = [
    (0.3, 0.05),
    (0.5, 0.05),
    (0.7, 0.05),
    (0.3, 0.2),
    (0.5, 0.2),
    (0.3, 0.5),
    (0.4, 0.5),
    (0.5, 0.5),
    (0.3, 1.0),
    (0.7, 0.5),
]


def sample_config(args) -> PrepConfig:
    """Each source subsampled (deterministically, by the prep's own weights) to ~args.prompts rows."""
    sources = []
    for name in args.sources:
        n = len(load_source(SourceConfig(path=f"builtin:{name}")))
        sources.append(SourceConfig(path=f"builtin:{name}", weight=min(1.0, args.prompts / n)))
    cfg = PrepConfig(
        model="builtin:smollm2",
        sources=sources,
        max_len=1024,
        heldout_fraction=0.2,  # both splits are regenerated and counted; enough for a small sample
        shard_rows=args.shard_rows,
        keep_values=True,
        output_root=args.out,
        responses="regenerate",
        generate=GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
    )
    cfg.validate()
    return cfg


def rows_by_source(folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for split in ("train", "eval"):
        for r in read_split(folder, split).to_pylist():
            out[r["source"]].append(r)
    return out


def sweep(rows: dict[str, list[dict]], vocab_size: int) -> list[dict]:
    """Re-segment the stored entropies (float16) at each (ratio, min_threshold)."""
    table = []
    for ratio, floor in GRID:
        label = LabelConfig(ratio=ratio, min_threshold=floor)
        entry = {"ratio": ratio, "min_threshold": floor, "sources": {}}
        tokens = segments = 0
        joined: list[float] = []
        for name, rs in rows.items():
            t = s = 0
            for r in rs:
                values = np.asarray(r["values"], dtype=np.float32)
                segs = segment(values, label, vocab_size)
                starts = np.cumsum([0] + segs[:-1])
                mask = np.ones(len(values), bool)
                mask[starts] = False  # the first token of each segment comes from the base's head
                joined += values[mask].tolist()
                t, s = t + len(values), s + len(segs)
            entry["sources"][name] = t / max(s, 1)
            tokens, segments = tokens + t, segments + s
        entry["all"] = tokens / max(segments, 1)
        entry["joined_entropy"] = float(np.mean(joined)) if joined else 0.0
        entry["joined_share"] = len(joined) / max(tokens, 1)
        table.append(entry)
    return table


def mixture_rows(config: str, names) -> dict[str, float]:
    """Prompts per source in `config`'s mixture (sources this sample lacks are left out)."""
    cfg = load_config(PrepConfig, config, [])
    return {source_name(s): len(load_source(s)) * s.weight for s in cfg.sources if source_name(s) in names}


def mixture_estimate(rows: dict[str, float], manifest: dict, compression: dict[str, float]) -> float:
    """The compression a mixture of `rows` prompts per source would label at, from this sample's
    tokens per row and the given per-source compression: sum of tokens over sum of segments."""
    tokens = segments = 0.0
    for name, n in rows.items():
        s = manifest["sources"][name]
        per_row = s["response_tokens"] / max(s["rows_out"], 1)
        tokens += n * per_row
        segments += n * per_row / compression[name]
    return tokens / max(segments, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24, help="about this many prompts per source")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--shard-rows", type=int, default=32)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES))
    ap.add_argument("--out", default="outputs/bench_distill")
    ap.add_argument(
        "--mixture", default="configs/prep_distill.yaml", help="config whose mixture is estimated"
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cfg = sample_config(args)
    distilled = prepare(cfg)
    reference = prepare(dataclasses.replace(cfg, responses="source"))
    md, mr = load_manifest(distilled), load_manifest(reference)
    from transformers import AutoConfig

    from hamburger.assets import resolve_model

    vocab = AutoConfig.from_pretrained(resolve_model(cfg.model)).vocab_size
    grid = sweep(rows_by_source(distilled), vocab)
    g = md["generation"]

    lines = [
        f"SmolLM2-135M-Instruct (fp32, CPU) writes greedy responses (max_new_tokens={args.max_new_tokens}, "
        f"batch {args.batch_size}, one rank) to ~{args.prompts} prompts per offline source, "
        "then data_prep labels them with decreasing_v2 (K=4, ratio 0.3, min_threshold 0.05). "
        "Compression = response tokens / segments (the best case of tokens per macro step). "
        "`reference`: the same rows with the source's own responses.",
        "",
        "| source | prompts | mean response tokens | cut at limit | compression self-distilled | compression reference |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.sources:
        sd, sr = md["sources"][name], mr["sources"][name]
        gen = sd["generation"]
        lines.append(
            f"| {name} | {gen['prompts']} | {gen['mean_response_tokens']:.1f} | {gen['cut_share']:.0%} | "
            f"{sd['compression']:.3f} | {sr['compression']:.3f} |"
        )
    lines.append(
        f"| **all** | {g['prompts']} | {g['mean_response_tokens']:.1f} | {g['cut_share']:.0%} | "
        f"**{md['compression']:.3f}** | {mr['compression']:.3f} |"
    )
    mix_rows = mixture_rows(args.mixture, md["sources"])
    mix = mixture_estimate(mix_rows, md, {n: md["sources"][n]["compression"] for n in mix_rows})
    lines += [
        "",
        f"`{args.mixture}`'s mixture ("
        + ", ".join(f"{n} {r:.0f} prompts" for n, r in mix_rows.items())
        + f") is estimated from these per-source numbers to label at **{mix:.3f}** tokens per segment "
        "(column `mixture` below for other thresholds).",
    ]
    lines += [
        "",
        f"Generation: {g['tokens_generated']} tokens in {g['seconds']:.0f} s ({g['tokens_per_second']:.1f} tokens/s "
        "through base_generate_batch, one process on the shared 2-core machine while other work ran).",
        "",
        "Threshold ablation (decreasing_v2, same self-distilled responses and entropies). `joined entropy`: "
        "mean base entropy (nats) of the tokens that join a segment instead of opening one, a proxy of the "
        "quality cost (what the micro decoder must get right without a base step).",
        "",
        "| ratio | min_threshold | "
        + " | ".join(args.sources)
        + " | all | mixture | joined share | joined entropy |",
        "|---|---|" + "---|" * len(args.sources) + "---|---|---|---|",
    ]
    for e in grid:
        per = " | ".join(f"{e['sources'].get(n, 0):.3f}" for n in args.sources)
        lines.append(
            f"| {e['ratio']} | {e['min_threshold']} | {per} | {e['all']:.3f} | "
            f"{mixture_estimate(mix_rows, md, e['sources']):.3f} | {e['joined_share']:.1%} | "
            f"{e['joined_entropy']:.3f} |"
        )
    body = "\n".join(lines)
    print(body)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_distill.json").write_text(
        json.dumps(
            {"distilled": md["sources"], "reference": mr["sources"], "generation": g, "grid": grid}, indent=1
        )
    )
    if not args.no_write:
        write_section("data_prep: compression of self-distilled responses", body)


if __name__ == "__main__":
    main()
