"""`./launch.sh label-view SHARDS_DIR [--n 5] [--split train] [--html out.html]`

Shows samples with their segments marked, like the paper's coloured figure, so a person can
judge the boundaries: in the terminal (alternating background colours per segment) and as an
HTML page (one coloured span per segment, its tokens' difficulty values on hover).
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from .shards import ShardError, load_manifest, read_split

COLOURS = ["#ffe08a", "#a8e6cf", "#ffb3ba", "#bae1ff"]
ANSI = ["\x1b[43m", "\x1b[42m", "\x1b[41m", "\x1b[44m"]
RESET = "\x1b[0m"


def segments_as_text(tokenizer, ids: list[int], prompt_len: int, seg_lens: list[int]) -> list[str]:
    """The response's segments, each decoded to text."""
    out, start = [], prompt_len
    for n in seg_lens:
        out.append(tokenizer.decode(ids[start : start + n]))
        start += n
    return out


def _where(row: dict) -> str:
    """Source, origin and, for a conversation's turn, which assistant turn this row learns."""
    meta = json.loads(row["meta"] or "{}")
    turn = f", assistant turn {meta['turn']} of {meta['turns']}" if "turn" in meta else ""
    return f"{row['source']}: {row['origin']}{turn}"


def render_terminal(prompt: str, segments: list[str]) -> str:
    body = "".join(f"{ANSI[i % len(ANSI)]}{s}{RESET}" for i, s in enumerate(segments))
    return f"\x1b[2m{prompt}\x1b[0m{body}"


def render_html(samples: list[dict], title: str) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".p{color:#777;white-space:pre-wrap}.r{white-space:pre-wrap;font-family:monospace}"
        ".s{border-radius:3px;padding:1px 0}.k{font-size:.9em;color:#555}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='k'>Each coloured span is one segment: one macro step, one KV-cache entry.</p>",
    ]
    for s in samples:
        spans = "".join(
            f"<span class='s' style='background:{COLOURS[i % len(COLOURS)]}' title='{html.escape(tip)}'>"
            f"{html.escape(seg)}</span>"
            for i, (seg, tip) in enumerate(zip(s["segments"], s["tips"], strict=True))
        )
        parts.append(
            f"<h3>sample {s['sample_id']} · {html.escape(s['source'])} · {s['tokens']} tokens in "
            f"{len(s['segments'])} segments ({s['tokens'] / len(s['segments']):.2f} per step)</h3>"
            f"<div class='p'>{html.escape(s['prompt'])}</div><div class='r'>{spans}</div>"
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--split", default="train")
    ap.add_argument("--html", default="")
    ap.add_argument("--show-prompt", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from hamburger.assets import resolve_model

    try:
        manifest = load_manifest(args.folder)
        table = read_split(args.folder, args.split).slice(0, args.n).to_pylist()
    except ShardError as e:
        raise SystemExit(f"[label-view] error: {e}") from None
    key = manifest["key"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(key["tokenizer"]))
    samples = []
    for row in table:
        ids, p = row["input_ids"], row["prompt_len"]
        segs = segments_as_text(tokenizer, ids, p, row["seg_lens"])
        values, start, tips = row["values"], 0, []
        for n in row["seg_lens"]:
            vals = values[start : start + n] if values else []
            tips.append(", ".join(f"{v:.2f}" for v in vals) if vals else f"{n} tokens")
            start += n
        prompt = tokenizer.decode(ids[:p])
        where = _where(row)
        samples.append(
            {
                "sample_id": row["sample_id"],
                "source": where,
                "prompt": prompt,
                "segments": segs,
                "tips": tips,
                "tokens": len(ids) - p,
            }
        )
        shown = prompt if args.show_prompt else ""
        print(f"--- sample {row['sample_id']} ({where}): {len(ids) - p} tokens, {len(segs)} segments")
        print(render_terminal(shown, segs))
    if args.html:
        title = f"Segments: {Path(args.folder).name} ({key['label']['strategy']})"
        Path(args.html).write_text(render_html(samples, title))
        print(f"wrote {args.html}")


if __name__ == "__main__":
    main()
