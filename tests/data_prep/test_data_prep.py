"""data_prep end to end on a tiny random Llama with SmolLM2's real tokenizer and local files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_model_dir, write_jsonl
from launcher import free_port
from transformers import AutoTokenizer, LlamaForCausalLM

from data_prep.config import PrepConfig, SourceConfig
from data_prep.fingerprint import vocab_fingerprint
from data_prep.run import prepare
from data_prep.shards import ShardError, load_manifest, read_split
from data_prep.sources import DataError, index_source, load_source
from data_prep.tokenize import ChatTokenizer
from data_prep.view import main as view_main
from hamburger.configio import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def corpus(tmp_path) -> Path:
    rows = [
        {"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}." + " Yes." * (i % 4)}
        for i in range(30)
    ]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def make_cfg(model: Path, out: Path, *sources: SourceConfig, **kw) -> PrepConfig:
    settings = {"shard_rows": 8, "heldout_fraction": 0.2, "max_len": 256, **kw}
    cfg = PrepConfig(model=str(model), sources=list(sources), output_root=str(out), **settings)
    cfg.validate()
    return cfg


def all_rows(folder: Path) -> dict[str, list[dict]]:
    return {s: read_split(folder, s).to_pylist() for s in load_manifest(folder)["splits"]}


def test_end_to_end_shards_and_manifest(tiny_dir, corpus, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "out", SourceConfig(path=str(corpus), weight=2.0), keep_values=True)
    folder = prepare(cfg)
    m = load_manifest(folder)
    assert m["rows_in"] == 30 and m["rows_out"] == 30 and m["skipped"] == {}
    assert m["splits"]["train"]["effective_rows"] == 2 * m["splits"]["train"]["rows"]
    assert 0 < m["splits"]["eval"]["rows"] < 15
    assert m["compression"] == pytest.approx(m["response_tokens"] / m["segments"])
    assert sum(m["segment_histogram"].values()) == m["segments"]
    assert m["key"]["label"]["strategy"] == "decreasing_v2" and m["key"]["max_len"] == 256
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert m["tokenizer_check"] == vocab_fingerprint(tok) and m["tokenizer_check"]["vocab_size"] == len(tok)
    chat = ChatTokenizer(tok)
    by_row = {r["origin"]: r for split in all_rows(folder).values() for r in split}
    src = load_source(cfg.sources[0])
    for conv in src.rows:
        r = by_row[f"{conv.file}:{conv.row}"]
        prompt = tok.apply_chat_template(
            conv.messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        response = tok(conv.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r["input_ids"] == list(prompt) + response == chat.encode(conv)[0]
        assert r["prompt_len"] == len(prompt)
        assert sum(r["seg_lens"]) == len(response) and len(r["values"]) == len(response)


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tiny_dir, corpus, tmp_path):
    one = prepare(make_cfg(tiny_dir, tmp_path / "one", SourceConfig(path=str(corpus))))
    cfg_file = tmp_path / "prep.yaml"
    cfg_file.write_text(
        f"model: {tiny_dir}\nsources:\n  - path: {corpus}\noutput_root: {tmp_path / 'two'}\n"
        "shard_rows: 8\nheldout_fraction: 0.2\nmax_len: 256\n"
    )
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            str(deepspeed),
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "data_prep.run",
            str(cfg_file),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on rank 0" in proc.stdout
    two = tmp_path / "two" / one.name  # same cache key, other root
    rows1, rows2 = all_rows(one), all_rows(two)
    for split in rows1:
        key = [(r["sample_id"], r["origin"], r["input_ids"], r["seg_lens"]) for r in rows1[split]]
        assert key == [(r["sample_id"], r["origin"], r["input_ids"], r["seg_lens"]) for r in rows2[split]]
        assert len({r["sample_id"] for r in rows2[split]}) == len(rows2[split])  # no overlap
    # rank 0 labelled only its share; every shard of the plan is in the manifest, so rank 1 did the rest
    total, on_rank0 = map(int, re.search(r"(\d+) shards, (\d+) on rank 0", proc.stdout).groups())
    assert total >= 2 and on_rank0 == (total + 1) // 2
    manifest = load_manifest(two)["splits"]
    assert sum(len(m["shards"]) for m in manifest.values()) == total


def test_kill_and_rerun_finishes_without_duplicates(tiny_dir, corpus, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "out", SourceConfig(path=str(corpus)))
    clean = prepare(make_cfg(tiny_dir, tmp_path / "clean", SourceConfig(path=str(corpus))))

    class Killed(Exception):
        pass

    def die_after_first(split, start):
        raise Killed

    with pytest.raises(Killed):
        prepare(cfg, on_shard_done=die_after_first)
    folder = tmp_path / "out" / clean.name
    assert not (folder / "manifest.json").exists()
    done = sorted(p.name for p in folder.glob("*.done.json"))
    assert len(done) == 1
    # what a SIGKILL mid-write leaves: a temporary file, and a shard without its marker
    (folder / "train-00001.parquet.tmp999").write_bytes(b"half a file")
    (folder / "train-00002.parquet").write_bytes(b"PAR1 truncated")
    first_bytes = (folder / done[0].replace(".done.json", ".parquet")).read_bytes()
    assert prepare(cfg) == folder
    assert (folder / done[0].replace(".done.json", ".parquet")).read_bytes() == first_bytes  # reused
    assert all_rows(folder) == all_rows(clean)


def test_same_key_reuses_changed_key_does_not(tiny_dir, corpus, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "out", SourceConfig(path=str(corpus)))
    a = prepare(cfg)
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg) == a and (a / "manifest.json").stat().st_mtime_ns == stamp
    cfg.label.ratio = 0.5
    b = prepare(cfg)
    assert b != a
    cfg.label.ratio = 0.3
    corpus.write_text(corpus.read_text() + json.dumps({"instruction": "new", "output": "row"}) + "\n")
    c = prepare(cfg)
    assert c not in (a, b) and load_manifest(c)["rows_in"] == 31


def test_overlong_skip_and_truncate(tiny_dir, tmp_path):
    fillers = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "short", "output": "fine"},
            {"instruction": "long answer", "output": "word " * 300},
            {"instruction": "x " * 400, "output": "prompt alone too long"},
            *fillers,
        ],
    )
    m = load_manifest(
        prepare(make_cfg(tiny_dir, tmp_path / "a", SourceConfig(path=str(data)), heldout_fraction=0.5))
    )
    assert m["rows_out"] == 11 and m["skipped"] == {"too_long": 1, "prompt_too_long": 1}
    cfg = make_cfg(
        tiny_dir, tmp_path / "b", SourceConfig(path=str(data)), heldout_fraction=0.5, overlong="truncate"
    )
    folder = prepare(cfg)
    m = load_manifest(folder)
    assert m["rows_out"] == 12 and m["skipped"] == {"prompt_too_long": 1}
    assert sum(e["truncated"] for e in m["splits"].values()) == 1
    longest = max(len(r["input_ids"]) for rows in all_rows(folder).values() for r in rows)
    assert longest == 256


def test_formats_filters_messages_and_weights(tmp_path):
    rows = [{"q": f"q{i}", "a": f"a{i}", "lang": "en" if i % 2 else "fr"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("q,a,lang\n" + "".join(f"q{i},a{i},en\n" for i in range(3)))
    (tmp_path / "d.json").write_text(json.dumps(rows[:4]))
    for name in ("d.parquet", "d.csv", "d.json"):
        src = load_source(SourceConfig(path=str(tmp_path / name), prompt_field="q", response_field="a"))
        assert src.rows[0].messages[-1]["content"] == "q0" and src.rows[0].response == "a0"
    cfg = load_config(
        PrepConfig,
        None,
        [
            f"sources=[{{path: '{tmp_path / 'd.parquet'}', prompt_field: q, "
            "response_field: a, system: Be brief., "
            "filters: [{field: lang, equals: en}]}]"
        ],
    )
    src = load_source(cfg.sources[0])
    assert len(src.rows) == 5 and src.skipped["filtered"] == 5
    assert src.rows[0].messages[0] == {"role": "system", "content": "Be brief."}
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    src = load_source(
        SourceConfig(path=str(write_jsonl(tmp_path / "c.jsonl", chat)), messages_field="messages")
    )
    assert src.rows[0].messages == [{"role": "user", "content": "hi"}] and src.rows[0].response == "hello"


def test_bad_input_is_named(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: missing field 'output'"):
        load_source(SourceConfig(path=str(bad)))
    src = load_source(SourceConfig(path=str(bad)), bad_rows="skip")
    assert len(src.rows) == 1 and src.skipped["bad_row"] == 1 and "row 2" in src.skip_examples[0]
    for rec, msg in [
        ({"instruction": "a", "output": 3}, "must be a string"),
        ({"instruction": "a", "output": "  "}, "is empty"),
    ]:
        f = write_jsonl(tmp_path / "x.jsonl", [rec])
        with pytest.raises(DataError, match=rf"x.jsonl: row 1: field 'output' {msg}"):
            load_source(SourceConfig(path=str(f)))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl: line 2: invalid JSON"):
        load_source(SourceConfig(path=str(tmp_path / "broken.jsonl")))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="corrupt.parquet: unreadable or corrupt"):
        load_source(SourceConfig(path=str(tmp_path / "corrupt.parquet")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_source(SourceConfig(path=str(tmp_path / "nope.jsonl")))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="label.stratgy"):
        load_config(PrepConfig, None, ["label.stratgy=fixed"])
    with pytest.raises(ConfigError, match="max_len"):
        load_config(PrepConfig, None, ["max_len=1.5"])
    with pytest.raises(ValueError, match="'label.strategy': Invalid value 'nope'"):
        load_config(PrepConfig, None, ["sources=[{path: x.jsonl}]", "label.strategy=nope"])
    with pytest.raises(ValueError, match="label.min_threshold"):
        load_config(PrepConfig, None, ["sources=[{path: x.jsonl}]", "label.min_threshold=-1"])


def test_tokenizer_without_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template: set chat_template=plain"):
        ChatTokenizer(tok, name="tiny")
    from data_prep.sources import Conversation

    ids, p = ChatTokenizer(tok, "plain").encode(
        Conversation([{"role": "user", "content": "hi"}], "yo", "s", "f", 1)
    )
    assert tok.decode(ids[:p]) == "user: hi\nassistant: " and ids[-1] == tok.eos_token_id


def test_corrupted_shard_detected_on_read(tiny_dir, corpus, tmp_path):
    folder = prepare(make_cfg(tiny_dir, tmp_path / "out", SourceConfig(path=str(corpus))))
    shard = folder / load_manifest(folder)["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard.name}: corrupt shard"):
        read_split(folder, "train")


def test_builtin_corpora_and_label_view(tiny_dir, tmp_path, capsys):
    chat = load_source(SourceConfig(path="builtin:chatterbot"))
    code = load_source(SourceConfig(path="builtin:humaneval"))
    assert len(chat.rows) > 1500 and len(code.rows) == 164
    assert code.rows[0].meta["task_id"] == "HumanEval/0" and "def check" in code.rows[0].meta["test"]
    cfg = make_cfg(
        tiny_dir,
        tmp_path / "out",
        SourceConfig(path="builtin:humaneval", weight=0.05),
        keep_values=True,
        max_len=1024,
    )
    folder = prepare(cfg)
    html = tmp_path / "view.html"
    view_main([str(folder), "--n", "2", "--html", str(html)])
    out = capsys.readouterr().out
    assert "\x1b[4" in out and "segments" in out
    page = html.read_text()
    assert page.count("class='s'") == sum(
        len(r["seg_lens"]) for r in read_split(folder, "train").to_pylist()[:2]
    )


def test_hf_dataset_path_on_a_local_folder(tmp_path):
    """The hub code path (datasets.load_dataset) exercised on a local data folder."""
    folder = tmp_path / "hf_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)])
    src = load_source(SourceConfig(hf_name=str(folder), split="train"))
    assert len(src.rows) == 5 and src.rows[2].response == "a2"
    assert src.rows[0].file.startswith("hf:") and len(src.content_hash) == 64


def test_subsampling_is_counted_once(tiny_dir, corpus, tmp_path):
    m = load_manifest(
        prepare(
            # ~15 rows kept: hold out half, so that both splits have rows whatever the (path-hashed) split
            make_cfg(
                tiny_dir, tmp_path / "out", SourceConfig(path=str(corpus), weight=0.5), heldout_fraction=0.5
            )
        )
    )
    assert m["rows_in"] == 30
    assert 5 <= m["skipped"]["subsampled"] <= 25
    assert m["rows_out"] + m["skipped"]["subsampled"] == 30


def test_new_weights_of_the_same_shape_give_a_new_key_and_fresh_labels(corpus, tmp_path):
    """Issue 13.2: the cache key took the weight file's size; it must take its content."""
    model = tiny_model_dir(tmp_path / "model", seed=0)
    cfg = make_cfg(model, tmp_path / "out", SourceConfig(path=str(corpus)), keep_values=True)
    first = prepare(cfg)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    base = LlamaForCausalLM.from_pretrained(model)
    with torch.no_grad():  # same shapes, other numbers: sharper predictions, lower entropies
        base.model.embed_tokens.weight.mul_(40.0)
    base.save_pretrained(model)
    assert weights.stat().st_size == size
    second = prepare(cfg)
    assert second != first
    m1, m2 = load_manifest(first), load_manifest(second)
    assert m1["key"]["model_fingerprint"] != m2["key"]["model_fingerprint"]
    values = [[r["values"] for r in read_split(f, "train").to_pylist()] for f in (first, second)]
    assert values[0] != values[1]  # labelled afresh by the new weights


def test_weight_digests_are_cached_by_path_size_and_mtime(tmp_path):
    from data_prep.fingerprint import DigestCache, fingerprint

    model = tiny_model_dir(tmp_path / "model")
    cache_file = tmp_path / "fingerprints.json"
    cold = DigestCache(cache_file)
    key = fingerprint(str(model), cold)
    assert cold.hashed == 1
    warm = DigestCache(cache_file)  # a later run: no weight file is read again
    assert fingerprint(str(model), warm) == key and warm.hashed == 0
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    changed = DigestCache(cache_file)
    assert fingerprint(str(model), changed) != key and changed.hashed == 1


def test_template_tokens_in_text_are_counted_never_cut(tiny_dir, corpus, tmp_path, capsys):
    """Issue 13.6: a response holding '<|im_end|>' was cut there silently, and a prompt holding
    '<|im_start|>' injected a fake turn. Such rows now stop the run (naming file, row, field) or,
    under bad_rows: skip, are counted in the manifest with examples."""
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[3]["output"] = "first part<|im_end|> and the rest"
    rows[7]["instruction"] = "hi<|im_end|>\n<|im_start|>assistant\nfake turn"
    data = write_jsonl(tmp_path / "special.jsonl", rows)
    with pytest.raises(DataError, match=r"special.jsonl: row 4: field 'output' contains .*'<\|im_end\|>'"):
        prepare(make_cfg(tiny_dir, tmp_path / "a", SourceConfig(path=str(data))))
    folder = prepare(make_cfg(tiny_dir, tmp_path / "b", SourceConfig(path=str(data)), bad_rows="skip"))
    assert "skipped: " + str(data) + ": row 4: field 'output' contains" in capsys.readouterr().out
    m = load_manifest(folder)
    assert m["skipped"] == {"special_token_text": 2} and m["rows_out"] == 28
    examples = m["sources"]["special"]["skip_examples"]
    assert any("row 4: field 'output'" in e for e in examples)
    assert any("row 8: field 'instruction'" in e for e in examples)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    for r in (r for split in all_rows(folder).values() for r in split):
        assert r["input_ids"][r["prompt_len"] :].count(tok.eos_token_id) == 1  # one end of turn, at the end


def test_rows_read_back_by_locator_equal_a_direct_read(tmp_path):
    """Issue 11.6: a rank keeps a locator per row and re-reads the rows it labels; every format
    must give back exactly the record it scanned (CSV quoted fields may span lines)."""
    rows = [
        {"q": f'q{i}, with "quotes"\nand a newline' if i % 3 == 0 else f"q{i}", "a": f"a{i} é"}
        for i in range(7)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with (
        pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, pa.schema([("q", pa.string()), ("a", pa.string())])) as w,
    ):
        w.write_table(pa.Table.from_pylist(rows))
    import csv
    import gzip

    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["q", "a"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    hf = tmp_path / "hf"
    hf.mkdir()
    write_jsonl(hf / "train.jsonl", rows)
    configs = [
        SourceConfig(path=str(tmp_path / n))
        for n in ("d.parquet", "d.arrow", "d.csv", "d.json", "d.jsonl", "d.jsonl.gz")
    ]
    configs.append(SourceConfig(hf_name=str(hf)))
    for cfg in configs:
        cfg.prompt_field, cfg.response_field = "q", "a"
        src = index_source(cfg)
        assert len(src) == 7 and src.locator.dtype == np.int64
        got = [(c.messages[-1]["content"], c.response) for c in src.rows[::-1]]  # any order
        assert got == [(r["q"], r["a"]) for r in rows[::-1]], cfg.path or cfg.hf_name


def test_scoring_memory_is_bounded_by_the_chunk_and_equals_the_reference():
    """Issue 11.2: the LM head runs on a chunk of positions at a time, so the largest logits
    tensor is chunk-sized however big the batch; values equal a plain per-sample forward."""
    import random

    from conftest import tiny_base

    from data_prep.label import Scorer

    vocab = 4096
    model = tiny_base(seed=3, vocab_size=vocab, num_hidden_layers=2)
    rng = random.Random(0)
    samples = [([rng.randrange(3, vocab) for _ in range(n)], 7) for n in (60, 55, 48, 40, 33, 20)]
    response_tokens = sum(len(ids) - p for ids, p in samples)
    seen: list[tuple[int, int]] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    chunk_rows = 16
    scorer = Scorer(model, torch.device("cpu"), pad_id=2, chunk_elements=chunk_rows * vocab)
    scores = scorer.score(samples, batch_tokens=4096)
    hook.remove()
    assert max(rows for rows, _ in seen) <= chunk_rows  # never a whole batch of logits
    assert sum(rows for rows, _ in seen) == response_tokens
    assert len(seen) >= response_tokens // chunk_rows  # the batch really was bigger than a chunk
    with torch.no_grad():
        for (ids, p), sc in zip(samples, scores, strict=True):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, p - 1 : -1].float(), -1)
            entropy = -(logp.exp() * logp).sum(-1)
            prob = logp.gather(1, torch.tensor(ids[p:])[:, None]).squeeze(1).exp()
            np.testing.assert_allclose(sc.entropy, entropy.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sc.prob, prob.numpy(), rtol=1e-4, atol=1e-7)


def test_utf8_byte_order_mark_is_not_data(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "q", "output": "a"}\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nq,a\n")
    for name in ("bom.jsonl", "bom.csv"):
        rows = index_source(SourceConfig(path=str(tmp_path / name))).rows
        assert [(r.messages[-1]["content"], r.response) for r in rows] == [("q", "a")]


PEAK_SCRIPT = """
import json, random, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from data_prep.label import Scorer
torch.set_num_threads(1)
torch.manual_seed(0)
vocab = 32768
cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
rng = random.Random(0)
samples = [([rng.randrange(3, vocab) for _ in range(520)], 20) for _ in range(8)]  # 4000 response tokens
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
for name, chunk in (("chunked", 1 << 22), ("whole", 1 << 40)):
    scorer = Scorer(model, torch.device("cpu"), pad_id=0, chunk_elements=chunk)
    scorer.score(samples[:1], 1 << 20)  # warm-up
    before = peak()
    scorer.score(samples, 1 << 20)  # one batch of 8 x 520 tokens
    out[name] = peak() - before
print(json.dumps(out))
"""


@pytest.mark.distributed
def test_scoring_peak_memory_does_not_grow_with_the_batch():
    """Issue 11.2, measured: peak RSS while scoring a 4,000-response-token batch at a 32k
    vocabulary. Whole-batch fp32 logits are 500 MiB per tensor; chunks of 2^22 logits are 16 MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert growth["chunked"] < 150, growth  # MiB: a few chunk-sized tensors
    assert growth["whole"] > 900, growth  # the measurement sees the unchunked tensors
