"""The shipped self-distilled corpus (issue 10): it reads, SmolLM2 regenerates a sample of it
token for token, `builtin:smollm2_distilled` preps its responses, and `export` writes a prep's
generated tokens exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model_dir, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.config import FilterConfig, GenerateConfig, PrepConfig, SourceConfig
from data_prep.distilled import export
from data_prep.distilled_asset import ASSET, read_asset
from data_prep.manifest import GENERATOR
from data_prep.run import prepare
from data_prep.shards import read_split
from data_prep.sources import Conversation
from data_prep.tokenize import ChatTokenizer
from hamburger.assets import resolve_model
from hamburger.decode.batched import base_generate_batch

SOURCES = ("chatterbot", "humaneval", "stdlib")
COMPARED = 64  # new tokens regenerated per prompt: a greedy prefix is exact too


@pytest.fixture(scope="module")
def shipped() -> tuple[dict, list[dict]]:
    return read_asset(ASSET)


def _key(rec: dict) -> str:
    return f"{rec['source']}:{rec['file']}:{rec['row']}"


def test_shipped_file_reads_with_header(shipped):
    header, records = shipped
    assert ASSET.stat().st_size < 1_000_000
    assert header["model"] == "builtin:smollm2" and header["generate"]["temperature"] == 0.0
    assert header["generate"]["max_new_tokens"] == 256 and header["prep_key_hash"]
    assert len(records) == header["records"] == 492
    assert {r["source"] for r in records} == set(SOURCES) == set(header["per_source"])
    assert len({_key(r) for r in records}) == len(records)
    for r in records:
        ids = r["response_ids"]
        assert 0 < len(ids) <= header["generate"]["max_new_tokens"]
        assert r["cut"] == (ids[-1] != header["eos_id"]) and (not r["cut"] or len(ids) == 256)
    assert header["cut"] == sum(r["cut"] for r in records)
    rt = header["roundtrip"]
    assert rt["exact"] + rt["cut_plus_eos"] + len(rt["differs"]) == len(records)
    assert header["unusable_as_source"] == []


@pytest.mark.smollm2
def test_smollm2_regenerates_a_sample_exactly(shipped):
    """The two shortest prompts of each source (deterministic), decoded together by the
    project's batched decoder in float32, give the shipped tokens (the first COMPARED)."""
    header, records = shipped
    path = resolve_model(header["model"])
    tok = AutoTokenizer.from_pretrained(path)
    chat = ChatTokenizer(tok, header["chat_template"])
    sample, prompts = [], []
    for source in SOURCES:
        rows = []
        for r in records:
            if r["source"] == source:
                ids = chat.prompt(Conversation([{"role": "user", "content": r["prompt"]}], "", "", "", 0))
                rows.append((len(ids), r["file"], r["row"], ids, r))
        for _, _, _, ids, r in sorted(rows, key=lambda x: x[:3])[:2]:
            prompts.append(ids)
            sample.append(r)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    new = min(COMPARED, header["generate"]["max_new_tokens"])
    with torch.no_grad():
        out = base_generate_batch(model, prompts, new, {header["eos_id"]}, pad)
    for r, o in zip(sample, out, strict=True):
        assert o.tokens == r["response_ids"][:new], _key(r)


def _prep(model: Path, out: Path, *sources: SourceConfig, **kw) -> Path:
    cfg = PrepConfig(
        model=str(model), sources=list(sources), output_root=str(out), max_len=1024, shard_rows=64, **kw
    )
    cfg.validate()
    return prepare(cfg)


def test_builtin_preps_the_shipped_responses(shipped, tmp_path):
    """A subset through the ordinary prep path (responses: source): every response is the
    shipped ids exactly (no re-tokenising, no EOS after a cut response); origins name the first
    sources; filters on `source` and `cut` select rows."""
    header, records = shipped
    model = tiny_model_dir(tmp_path / "model")
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(str(model)))
    assert chat.template == header["chat_template"] and chat.vocab_sha256 == header["vocab_sha256"]
    only = [FilterConfig(field="source", equals="humaneval"), FilterConfig(field="cut", equals="False")]
    folder = _prep(
        model,
        tmp_path / "out",
        SourceConfig(path="builtin:smollm2_distilled", weight=0.1),
        SourceConfig(path="builtin:smollm2_distilled", name="humaneval", weight=0.2, filters=only),
        heldout_fraction=0.2,
    )
    by_origin = {f"{r['file']}:{r['row']}": r for r in records}
    rows = read_split(folder, "train").to_pylist() + read_split(folder, "eval").to_pylist()
    assert {r["source"] for r in rows} == {"smollm2_distilled", "humaneval"} and len(rows) > 40
    differs = set(header["roundtrip"]["differs"])
    assert any(_key(by_origin[r["origin"]]) in differs for r in rows)  # text would not round-trip
    assert any(by_origin[r["origin"]]["cut"] for r in rows)
    for row in rows:
        rec = by_origin[row["origin"]]
        if row["source"] == "humaneval":
            assert rec["source"] == "humaneval" and not rec["cut"]
        assert row["input_ids"][row["prompt_len"] :] == rec["response_ids"], _key(rec)


def test_exact_ids_only_with_their_vocabulary_and_no_eos_after_a_cut(tmp_path):
    """Another vocabulary re-tokenises the text (the ids would mean other tokens), and a
    response cut at the generation limit still gets no EOS."""
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(str(tiny_model_dir(tmp_path / "model"))))
    msgs = [{"role": "user", "content": "Say hi"}]
    text_ids = chat.encode(Conversation(msgs, "Hello there", "s", "f", 1))
    assert text_ids[0][-1] == chat.eos
    ids = [9, 8, 7]
    same = Conversation(msgs, "Hello there", "s", "f", 1, response_ids=ids, ids_vocab=chat.vocab_sha256)
    assert chat.encode(same)[0][chat.encode(same)[1] :] == ids
    other = Conversation(
        msgs, "Hello there", "s", "f", 1, response_ids=ids, ids_vocab="another", complete=False
    )
    assert chat.encode(other)[0] == text_ids[0][:-1]


def test_export_writes_the_generated_tokens(tmp_path):
    """export on a small self-distilled prep (tiny model): each record holds the shard's exact
    response ids and prompt, the header the generation settings; the file is byte-stable."""
    model = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(
        tmp_path / "q.jsonl", [{"instruction": f"Count to {i}, please.", "output": "x"} for i in range(12)]
    )
    folder = _prep(
        model,
        tmp_path / "out",
        SourceConfig(path=str(data)),
        heldout_fraction=0.25,
        responses="regenerate",
        generate=GenerateConfig(max_new_tokens=6, batch_size=4),
    )
    header = export(folder, tmp_path / "a.jsonl.gz")
    _, records = read_asset(tmp_path / "a.jsonl.gz")
    assert header["records"] == len(records) == 12 and header["generate"]["max_new_tokens"] == 6
    assert header["generator"] == GENERATOR and "unusable_as_source" in header
    by_origin = {f"{r['file']}:{r['row']}": r for r in records}
    for split in ("train", "eval"):
        for row in read_split(folder, split).to_pylist():
            rec = by_origin[row["origin"]]
            assert rec["response_ids"] == row["input_ids"][row["prompt_len"] :] and rec["split"] == split
            assert rec["prompt"] == f"Count to {int(row['origin'].rsplit(':', 1)[1]) - 1}, please."
    first = (tmp_path / "a.jsonl.gz").read_bytes()
    export(folder, tmp_path / "a.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == first


def test_a_user_file_cannot_inject_exact_ids_or_drop_the_eos(tmp_path):
    """`_response` (exact ids, no EOS after a cut) is honoured only from the shipped builtin: in a
    user's row it is an ordinary unknown field, and the response text is tokenised as usual."""
    from data_prep.sources import to_conversation

    rec = {
        "instruction": "Say hi",
        "output": "Hello there",
        "_response": {"ids": [1, 2, 3], "vocab_sha256": "x", "complete": False},
    }
    conv = to_conversation(rec, SourceConfig(path=str(tmp_path / "u.jsonl")), "u", "u.jsonl", 1)
    assert conv.response_ids is None and conv.complete
    shipped = to_conversation(rec, SourceConfig(path="builtin:smollm2_distilled"), "d", "f", 1)
    assert shipped.response_ids == [1, 2, 3] and not shipped.complete
