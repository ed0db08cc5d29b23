"""Self-distillation in data_prep (responses: regenerate) on a tiny random Llama with SmolLM2's
real tokenizer: the responses are the batched decoder's, a killed run resumes exactly, every
generation setting is in the cache key, and prompt-only sources work."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from helpers import write_jsonl
from launcher import free_port
from transformers import AutoTokenizer, LlamaForCausalLM

from data_prep.config import GenerateConfig, PrepConfig, SourceConfig
from data_prep.fingerprint import DigestCache
from data_prep.regenerate import Regenerator
from data_prep.run import cache_key, key_hash, prepare
from data_prep.shards import load_manifest, read_split
from data_prep.sources import Conversation, index_source, load_source
from data_prep.tokenize import ChatTokenizer
from hamburger.assets import smollm2_tokenizer_dir
from hamburger.configio import ConfigError, load_config
from hamburger.decode.batched import base_generate_batch
from hamburger.decode.sampling import draw, seeded_generator

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 6


PROMPTS = [f"Tell me about the number {i}." + " Please." * (i % 5) for i in range(20)]


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (untied, wide initialisation: varied tokens, unlike a tied one that
    repeats its input) that ends some answers: EOS's output row is a scaled copy of the row of
    the token the model emits most often after the first, so EOS wins at some of its places."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    tok_dir = smollm2_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        num_hidden_layers=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    chat = ChatTokenizer(tok)
    prompts = [chat.prompt(Conversation([{"role": "user", "content": q}], "", "q", "f", 0)) for q in PROMPTS]
    later = Counter(t for r in base_generate_batch(model, prompts, MAX_NEW, None, 0) for t in r.tokens[1:])
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.5 * model.lm_head.weight[later.most_common(1)[0][0]]
    model.save_pretrained(d)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def prompts_only(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "prompts.jsonl", [{"question": q} for q in PROMPTS])


@pytest.fixture(scope="module")
def regenerated(eos_dir, prompts_only, tmp_path_factory) -> Path:
    """The prompts regenerated greedily in one uninterrupted run."""
    return prepare(make_cfg(eos_dir, tmp_path_factory.mktemp("clean"), prompt_source(prompts_only)))


def make_cfg(model: Path, out: Path, source: SourceConfig, **generate) -> PrepConfig:
    cfg = PrepConfig(
        model=str(model),
        sources=[source],
        output_root=str(out),
        shard_rows=6,
        heldout_fraction=0.2,
        max_len=256,
        responses="regenerate",
        generate=GenerateConfig(**{"max_new_tokens": MAX_NEW, "batch_size": 4, **generate}),
    )
    cfg.validate()
    return cfg


def prompt_source(path: Path) -> SourceConfig:
    return SourceConfig(path=str(path), prompt_field="question", response_field="")


def all_rows(folder: Path) -> dict[str, list[dict]]:
    return {s: read_split(folder, s).to_pylist() for s in load_manifest(folder)["splits"]}


def token_ids(folder: Path) -> dict[str, list[list[int]]]:
    return {split: [r["input_ids"] for r in rows] for split, rows in all_rows(folder).items()}


def test_greedy_regeneration_equals_the_batched_decoder(eos_dir, regenerated):
    folder = regenerated
    model = LlamaForCausalLM.from_pretrained(eos_dir)
    eos = AutoTokenizer.from_pretrained(eos_dir).eos_token_id
    rows = [r for split in all_rows(folder).values() for r in split]
    assert len(rows) == 20
    ended = 0
    for r in rows:  # each prompt alone through the decoder: the batch and its padding change nothing
        prompt, response = r["input_ids"][: r["prompt_len"]], r["input_ids"][r["prompt_len"] :]
        alone = base_generate_batch(model, [prompt], MAX_NEW, {eos}, eos)[0].tokens
        assert response == alone
        assert sum(r["seg_lens"]) == len(response)
        ended += response[-1] == eos
        assert response[-1] == eos or len(response) == MAX_NEW
    assert 0 < ended < len(rows)  # both ways of ending are covered
    m = load_manifest(folder)
    g = m["generation"]
    assert g["prompts"] == 20 and g["cut_at_limit"] == 20 - ended
    assert g["tokens_generated"] == sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
    assert g["cut_share"] == pytest.approx((20 - ended) / 20)
    assert g["settings"]["max_new_tokens"] == MAX_NEW and g["settings"]["temperature"] == 0
    assert m["sources"]["prompts"]["generation"]["prompts"] == 20
    assert m["key"]["responses"] == "regenerate"


def test_static_regeneration_writes_the_eager_responses(eos_dir, prompts_only, regenerated, tmp_path):
    """generate.decode=static (the slot engine; graphed on a GPU) writes the very rows the eager
    batch writes, greedy and sampled; eager keeps the key runs had before the setting existed."""
    src = prompt_source(prompts_only)
    folder = prepare(make_cfg(eos_dir, tmp_path / "g", src, decode="static"))
    assert folder != regenerated and token_ids(folder) == token_ids(regenerated)
    assert "decode" not in load_manifest(regenerated)["key"]["generate"]
    sampling = {"temperature": 1.0, "top_p": 0.95}
    static = prepare(make_cfg(eos_dir, tmp_path / "s", src, decode="static", **sampling))
    eager = prepare(make_cfg(eos_dir, tmp_path / "e", src, **sampling))
    assert token_ids(static) == token_ids(eager) != token_ids(regenerated)
    with pytest.raises(ValueError, match="generate.decode must be one of"):
        GenerateConfig(decode="fast").validate()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_the_next_shard_starts_while_a_shard_ends_and_writes_the_same(eos_dir, decode):
    """With the next shard's prompts passed along, its rows join as this shard's leave, and its
    responses are those it gets decoded on its own (greedy and sampled)."""
    model = LlamaForCausalLM.from_pretrained(eos_dir).eval()
    eos = AutoTokenizer.from_pretrained(eos_dir).eos_token_id
    a = [[5 + i] * (3 + i % 4) for i in range(6)]
    b = [[40 + i] * (2 + i % 3) for i in range(5)]
    for temperature in (0.0, 1.0):
        cfg = GenerateConfig(max_new_tokens=MAX_NEW, batch_size=4, temperature=temperature, decode=decode)
        ahead = Regenerator(model, cfg, eos, eos)
        first = ahead.responses(a, "train-00000", ("train-00001", b))
        assert ahead._joined  # rows of the next shard started
        second = ahead.responses(b, "train-00001")
        assert ahead._live is None and not ahead._carried
        alone = [
            Regenerator(model, cfg, eos, eos).responses(p, n)
            for p, n in ((a, "train-00000"), (b, "train-00001"))
        ]
        assert [first, second] == alone
    ahead.responses(a, "train-00000", ("train-00001", b))
    with pytest.raises(RuntimeError, match="not the shard started ahead"):
        ahead.responses(b, "train-00002")


def test_cut_responses_can_be_skipped_and_are_counted(eos_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative source path: the held-out split (hashed from it) is fixed
    write_jsonl(tmp_path / "prompts.jsonl", [{"question": q} for q in PROMPTS])
    src = prompt_source(Path("prompts.jsonl"))
    keep = load_manifest(prepare(make_cfg(eos_dir, tmp_path / "a", src)))
    skip = load_manifest(prepare(make_cfg(eos_dir, tmp_path / "b", src, at_limit="skip")))
    cut = keep["generation"]["cut_at_limit"]
    assert 0 < cut < 20 and skip["generation"]["cut_at_limit"] == cut
    assert skip["skipped"] == {"cut_at_limit": cut} and skip["rows_out"] == 20 - cut


def test_killed_regeneration_resumes_without_duplicates_or_losses(
    eos_dir, prompts_only, regenerated, tmp_path
):
    cfg = make_cfg(eos_dir, tmp_path / "out", prompt_source(prompts_only))
    clean = regenerated

    class Killed(Exception):
        pass

    def die_after_first(split, start):
        raise Killed

    with pytest.raises(Killed):
        prepare(cfg, on_shard_done=die_after_first)
    folder = tmp_path / "out" / clean.name
    done = sorted(p.name for p in folder.glob("*.done.json"))
    assert len(done) == 1 and not (folder / "manifest.json").exists()
    (folder / "train-00001.parquet").write_bytes(b"PAR1 truncated")  # a shard killed mid-write
    first = (folder / done[0].replace(".done.json", ".parquet")).read_bytes()
    assert prepare(cfg) == folder
    assert (folder / done[0].replace(".done.json", ".parquet")).read_bytes() == first  # not redone
    rows = all_rows(folder)
    assert rows == all_rows(clean)
    assert sum(map(len, rows.values())) == 20
    for split in rows:
        assert len({r["sample_id"] for r in rows[split]}) == len(rows[split])
    g, g_clean = load_manifest(folder)["generation"], load_manifest(clean)["generation"]
    assert (g["prompts"], g["tokens_generated"]) == (g_clean["prompts"], g_clean["tokens_generated"])


def _key(cfg: PrepConfig, tmp_path: Path) -> str:
    tok = AutoTokenizer.from_pretrained(cfg.model)
    chat = ChatTokenizer(tok)
    sources = [index_source(s) for s in cfg.sources]
    return key_hash(cache_key(cfg, sources, chat.template, cfg.model, cfg.model, DigestCache(None)))


@pytest.mark.parametrize(
    "setting, value",
    [
        ("max_new_tokens", 7),
        ("temperature", 0.7),
        ("top_p", 0.9),
        ("seed", 1),
        ("batch_size", 5),
        ("at_limit", "skip"),
        ("decode", "static"),
    ],
)
def test_every_generation_setting_changes_the_key(eos_dir, prompts_only, tmp_path, setting, value):
    cfg = make_cfg(eos_dir, tmp_path, prompt_source(prompts_only))
    other = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, **{setting: value}))
    assert _key(other, tmp_path) != _key(cfg, tmp_path)


def test_source_responses_keep_their_old_key_and_regenerating_changes_it(eos_dir, tmp_path):
    corpus = write_jsonl(
        tmp_path / "qa.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    )
    cfg = make_cfg(eos_dir, tmp_path, SourceConfig(path=str(corpus)))
    source = dataclasses.replace(cfg, responses="source")
    key = cache_key(
        source, [index_source(s) for s in cfg.sources], "t", cfg.model, cfg.model, DigestCache(None)
    )
    assert "generate" not in key and "responses" not in key  # folders prepared before this option stay valid
    assert _key(source, tmp_path) != _key(cfg, tmp_path)
    regenerated = dataclasses.replace(source, generate=dataclasses.replace(cfg.generate, max_new_tokens=9))
    assert _key(regenerated, tmp_path) == _key(source, tmp_path)  # unused settings do not matter


def test_prompt_only_source_needs_regenerate(eos_dir, prompts_only, tmp_path):
    src = prompt_source(prompts_only)
    assert load_source(src).rows[3].response == "" and len(load_source(src)) == 20
    with pytest.raises(ValueError, match=r"sources\.0\.response_field is empty.*responses: regenerate"):
        PrepConfig(model=str(eos_dir), sources=[src]).validate()
    yaml = tmp_path / "prep.yaml"
    yaml.write_text(
        f"model: {eos_dir}\nsources:\n  - path: {prompts_only}\n    prompt_field: question\n"
        "    response_field: ''\n"
    )
    with pytest.raises((ConfigError, ValueError), match="responses: regenerate"):
        load_config(PrepConfig, str(yaml), [])
    cfg = load_config(PrepConfig, str(yaml), ["responses=regenerate", "generate.max_new_tokens=4"])
    assert cfg.responses == "regenerate" and cfg.generate.max_new_tokens == 4
    with pytest.raises((ConfigError, ValueError), match="generate.top_p"):
        load_config(PrepConfig, str(yaml), ["responses=regenerate", "generate.top_p=0"])
    with pytest.raises((ConfigError, ValueError), match="responses"):
        load_config(PrepConfig, str(yaml), ["responses=rewrite"])


def test_stdlib_prompts_are_code_with_their_source_as_response():
    src = load_source(SourceConfig(path="builtin:stdlib"))
    assert len(src) > 150
    rows = src.rows
    assert len({(r.file, r.row) for r in rows}) == len(rows)
    for r in rows[:20]:
        prompt = r.messages[-1]["content"]
        name = r.meta["function"].rsplit(".", 1)[1]
        assert f"def {name}(" in prompt and r.response.startswith(f"```python\ndef {name}(")


def test_sampler_keeps_the_nucleus_and_follows_its_generator():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = seeded_generator(0)
    draws = [draw(logits, 1.0, 0.7, gen) for _ in range(600)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reach 0.7: the other two are cut
    assert abs(draws.count(0) / 600 - 0.5 / 0.8) < 0.07
    again = seeded_generator(0)
    assert [draw(logits, 1.0, 0.7, again) for _ in range(600)] == draws
    cold = seeded_generator(0)
    assert all(draw(logits, 1e-4, 1.0, cold) == 0 for _ in range(50))


def test_sampled_regeneration_is_seeded_per_row_and_resumes_exactly(
    eos_dir, prompts_only, regenerated, tmp_path
):
    """Each response draws from its own generator (seed, shard, row): a resumed shard samples
    the same tokens, and so does another batch size (rows join and leave in another order)."""
    src = prompt_source(prompts_only)
    sampled = prepare(make_cfg(eos_dir, tmp_path / "a", src, temperature=1.0, top_p=0.95))
    one_by_one = prepare(make_cfg(eos_dir, tmp_path / "d", src, temperature=1.0, top_p=0.95, batch_size=1))
    assert token_ids(one_by_one) == token_ids(sampled)

    class Killed(Exception):
        pass

    def die(split, start):
        raise Killed

    cfg = make_cfg(eos_dir, tmp_path / "b", src, temperature=1.0, top_p=0.95)
    with pytest.raises(Killed):
        prepare(cfg, on_shard_done=die)
    assert all_rows(prepare(cfg)) == all_rows(sampled)  # the redone shards sample the same tokens
    reseeded = prepare(make_cfg(eos_dir, tmp_path / "c", src, temperature=1.0, top_p=0.95, seed=1))
    assert token_ids(sampled) != token_ids(reseeded)
    assert token_ids(sampled) != token_ids(regenerated)


@pytest.mark.distributed
def test_two_ranks_regenerate_what_one_rank_does(eos_dir, prompts_only, regenerated, tmp_path):
    """Shards are split over ranks as in labelling: each rank writes its own shards' responses."""
    cfg_file = tmp_path / "prep.yaml"
    cfg_file.write_text(
        f"model: {eos_dir}\nsources:\n  - path: {prompts_only}\n    prompt_field: question\n"
        f"    response_field: ''\noutput_root: {tmp_path / 'two'}\nshard_rows: 6\nheldout_fraction: 0.2\n"
        f"max_len: 256\nresponses: regenerate\ngenerate:\n  max_new_tokens: {MAX_NEW}\n  batch_size: 4\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_accelerators", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, "--module", "data_prep.run", str(cfg_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total, on_rank0 = map(int, re.search(r"(\d+) shards, (\d+) on rank 0", proc.stdout).groups())
    assert total >= 2 and on_rank0 == (total + 1) // 2
    two = tmp_path / "two" / regenerated.name  # the same cache key
    assert all_rows(two) == all_rows(regenerated)
    assert load_manifest(two)["generation"]["prompts"] == 20


def test_max_new_tokens_past_the_models_context_is_refused_naming_both_numbers():
    """max_len may exceed what the model reads: regeneration is bounded by its context too."""
    import pytest
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from data_prep.config import GenerateConfig
    from data_prep.regenerate import Regenerator

    cfg = tiny_llama_config(num_hidden_layers=1, max_position_embeddings=128)
    with pytest.raises(
        ValueError,
        match=r"generate\.max_new_tokens \(512\) cannot fit in the model's context \(128 positions\)",
    ):
        Regenerator(LlamaForCausalLM(cfg), GenerateConfig(max_new_tokens=512), eos_id=1, pad_id=0)
