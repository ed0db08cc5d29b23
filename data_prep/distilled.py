"""The shipped self-distilled corpus: SmolLM2's own greedy responses, generated once.

`responses: regenerate` (configs/prep_distill.yaml) has the base write every response, which
takes about 20 minutes of CPU for the 492 prompts of that config. `export` turns such a prep
folder into one small gzipped JSON Lines file shipped with the package
(data_prep/assets/smollm2_distilled.jsonl.gz), so that `builtin:smollm2_distilled` can label
the base's own responses without regenerating them:

    python -m data_prep.distilled export PREP_DIR --out data_prep/assets/smollm2_distilled.jsonl.gz

Line 1 is a header (how the responses were produced: model, generation settings, the prep's
key hash, the round-trip counts below); every other line is one response: its original
source, file and row, the user prompt, the response text (decoded without special tokens),
the exact generated token ids and whether the response was cut at max_new_tokens.

The text of a response does not always tokenise back to the generated ids (a model may write
a token sequence the tokenizer would merge differently); the header counts how many do, since
a prep with `responses: source` tokenises the text. A cut response has no EOS, and a source
response always gets one: those are counted apart.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

from .config import FilterConfig, SourceConfig, source_name
from .distilled_asset import ASSET, FORMAT
from .records import DataError
from .shards import load_manifest, read_split
from .sources import Conversation, SourceIndex, index_source
from .tokenize import ChatTokenizer, special_token_pattern


# ---------------------------------------------------------------- export
def _source_config(cfg: dict) -> SourceConfig:
    filters = [FilterConfig(**f) for f in cfg.get("filters") or []]
    return SourceConfig(**{**cfg, "filters": filters})


def _index_sources(key: dict, special) -> dict[str, tuple[SourceIndex, dict[tuple[str, int], int]]]:
    """The prep's sources, re-read as the prep read them, with a (file, row) -> index lookup."""
    out = {}
    for entry in key["sources"]:
        src = index_source(_source_config(entry["config"]), key["bad_rows"], special)
        if src.content_hash != entry["content_hash"]:
            raise DataError(
                f"source {src.name!r}: its content changed since the prep (hash {src.content_hash[:12]}, "
                f"the prep's {entry['content_hash'][:12]}): the prompts cannot be matched"
            )
        out[src.name] = (src, {(src.file(i), int(src.row[i])): i for i in range(len(src))})
    return out


def _record(row: dict, split: str, sources, chat: ChatTokenizer) -> dict:
    """One shard row -> one corpus record; the rebuilt prompt must tokenise to the shard's."""
    file, _, line = row["origin"].rpartition(":")
    where = f"{split} sample {row['sample_id']} ({row['source']} {row['origin']})"
    src, lookup = sources[row["source"]]
    conv = src.conversation(lookup[(file, int(line))])
    if [m["role"] for m in conv.messages] != ["user"]:
        raise DataError(f"{where}: only single user-turn prompts are exported, got {conv.messages}")
    ids, p = row["input_ids"], row["prompt_len"]
    if chat.prompt(conv) != ids[:p]:
        raise DataError(f"{where}: the source's prompt no longer tokenises to the shard's prompt")
    response = ids[p:]
    return {
        "source": row["source"],
        "split": split,
        "sample_id": row["sample_id"],
        "file": file,
        "row": int(line),
        "prompt": conv.messages[0]["content"],
        "response": chat.tokenizer.decode(response, skip_special_tokens=True),
        "response_ids": response,
        "cut": response[-1] != chat.eos,
        "meta": json.loads(row["meta"]),
    }


def _key(rec: dict) -> str:
    return f"{rec['source']}:{rec['file']}:{rec['row']}"


def roundtrip(records: list[dict], chat: ChatTokenizer) -> dict:
    """How the response texts tokenise through the prep's path (chat template + tokenizer):
    `exact` gives the generated ids, `cut_plus_eos` gives a cut response's ids plus the EOS a
    source response always ends with, `differs` lists the others as source:file:row."""
    counts: dict = {"exact": 0, "cut_plus_eos": 0, "differs": []}
    for rec in records:
        conv = Conversation([{"role": "user", "content": rec["prompt"]}], rec["response"], "", "", 0)
        ids, p = chat.encode(conv)
        got, want = ids[p:], rec["response_ids"]
        if got == want:
            counts["exact"] += 1
        elif rec["cut"] and got == want + [chat.eos]:
            counts["cut_plus_eos"] += 1
        else:
            counts["differs"].append(_key(rec))
    return counts


def export(prep_dir: str | Path, out: str | Path) -> dict:
    """Write the corpus file from a finished `responses: regenerate` prep; returns its header."""
    from transformers import AutoTokenizer

    from hamburger.assets import resolve_model

    manifest = load_manifest(prep_dir)
    key = manifest["key"]
    if key.get("responses") != "regenerate":
        raise DataError(
            f"{prep_dir}: not a self-distilled prep (responses: {key.get('responses', 'source')})"
        )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(key["tokenizer"]))
    chat = ChatTokenizer(tokenizer, key["chat_template"])
    special = special_token_pattern(tokenizer)
    sources = _index_sources(key, special)
    records = [
        _record(row, split, sources, chat)
        for split in ("train", "eval")
        for row in read_split(prep_dir, split).to_pylist()
    ]
    records.sort(key=lambda r: (r["source"], r["file"], r["row"]))
    # Kept (the file is the prep's), but a prep with responses: source rejects these rows as bad:
    # an empty text (the base answered EOS, or only special tokens) or a special token's text.
    unusable = [
        _key(r) for r in records if not r["response"].strip() or (special and special.search(r["response"]))
    ]
    header = {
        "format": FORMAT,
        "model": key["model"],
        "model_fingerprint": key["model_fingerprint"],
        "tokenizer": key["tokenizer"],
        "chat_template": key["chat_template"],
        "eos_id": chat.eos,
        "vocab_sha256": chat.vocab_sha256,
        "generate": key["generate"],
        "generator": key["generator"],
        "dtype": key["label"]["dtype"],
        "max_len": key["max_len"],
        "prep_key_hash": manifest["key_hash"],
        "sources": {
            source_name(_source_config(e["config"])): {
                "path": e["config"]["path"],
                "weight": e["config"]["weight"],
                "content_hash": e["content_hash"],
            }
            for e in key["sources"]
        },
        "per_source": {name: sum(r["source"] == name for r in records) for name in sources},
        "records": len(records),
        "cut": sum(r["cut"] for r in records),
        "response_tokens": sum(len(r["response_ids"]) for r in records),
        "roundtrip": roundtrip(records, chat),
        "unusable_as_source": unusable,
        "command": f"python -m data_prep.distilled export {prep_dir} --out {out}",
    }
    _write(Path(out), [header, *records])
    return header


def _write(path: Path, lines: list[dict]) -> None:
    """Byte-identical output for the same input (gzip without a timestamp or file name)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for obj in lines:
            gz.write((json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.distilled", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the corpus file from a responses: regenerate prep folder")
    ex.add_argument("prep_dir")
    ex.add_argument("--out", default=str(ASSET))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    header = export(args.prep_dir, args.out)
    rt = header["roundtrip"]
    size = Path(args.out).stat().st_size
    print(
        f"[distilled] wrote {args.out}: {header['records']} responses {header['per_source']}, "
        f"{header['response_tokens']} tokens, {header['cut']} cut, {size / 1e6:.2f} MB; "
        f"text -> ids round trip: {rt['exact']} exact, {rt['cut_plus_eos']} cut + EOS, "
        f"{len(rt['differs'])} differ; {len(header['unusable_as_source'])} unusable as source responses"
    )


if __name__ == "__main__":
    main()
