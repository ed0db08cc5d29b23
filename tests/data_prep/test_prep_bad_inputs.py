"""data_prep's part of the bad-input matrix: what a careful user can get wrong in source files,
prep config values and whole prep runs (and the label viewer's folder), one case per line, and the
message fragment they must see (it names the file, the line or row, and the field or key).

Each section is one table and one small helper; a new case is one line in its table.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from helpers import tiny_model_dir
from transformers import AutoTokenizer

from data_prep.config import PrepConfig, SourceConfig
from data_prep.run import prepare
from data_prep.sources import DataError, index_source
from data_prep.tokenize import special_token_pattern
from hamburger.assets import smollm2_tokenizer_dir
from hamburger.configio import load_config

# ================================================================ data prep: source files
GOOD = '{"instruction": "q", "output": "a"}\n'
CHAT = '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "a"}]}\n'

# (file name, file content, source keys, message fragment, rows counted under bad_rows: skip;
#  None: the whole file is refused even under skip)
# fmt: off
PREP_SOURCE_CASES = [
    ("extra.csv", "instruction,output\nq,a\nq,a,oops\n", {}, "extra.csv: line 3: 3 fields, the header has 2", 1),
    ("short.csv", "instruction,output\nq\nq,a\n", {}, "short.csv: line 2: 1 fields, the header has 2", 1),
    ("latin1.csv", b"instruction,output\nq,a\ncaf\xe9,a\n", {}, "latin1.csv: line 3: not valid UTF-8", 1),
    ("latin1.jsonl", GOOD.encode() + b'{"instruction": "caf\xe9", "output": "a"}\n', {}, "latin1.jsonl: line 2: not valid UTF-8", 1),
    ("latin1.json", b'[{"instruction": "q", "output": "a"},\n{"instruction": "caf\xe9"}]', {}, "latin1.json: line 2: not valid UTF-8", None),
    ("notjson.jsonl", GOOD + "{not json\n", {}, "notjson.jsonl: line 2: invalid JSON", 1),
    ("array.jsonl", GOOD + "[1, 2]\n", {}, "array.jsonl: row 2: a record must be an object, got list", 1),
    ("missing.jsonl", GOOD + '{"instruction": "q"}\n', {}, "missing.jsonl: row 2: missing field 'output'", 1),
    ("number.jsonl", GOOD + '{"instruction": "q", "output": 3}\n', {}, "row 2: field 'output' must be a string, got int", 1),
    ("blank.jsonl", GOOD + '{"instruction": "q", "output": "  "}\n', {}, "row 2: field 'output' is empty", 1),
    ("imend.jsonl", GOOD + '{"instruction": "q", "output": "a<|im_end|>b"}\n', {}, "row 2: field 'output' contains the tokenizer's special token '<|im_end|>'", 1),
    ("turn.jsonl", GOOD + '{"instruction": "q<|im_start|>assistant", "output": "a"}\n', {}, "row 2: field 'instruction' contains the tokenizer's special token '<|im_start|>'", 1),
    ("chat.jsonl", CHAT % "hi" + CHAT % "<|endoftext|>", {"messages_field": "messages"}, "row 2: field 'messages[0].content' contains", 1),
    ("csvnone.csv", "instruction,output\nq,a\n,a\n", {}, "csvnone.csv: row 3: field 'instruction' is empty", 1),
    ("empty.jsonl", "", {}, "empty.jsonl: empty file: no records", None),
    ("blanklines.jsonl", "\n\n\n", {}, "blanklines.jsonl: empty file: no records", None),
    ("header.csv", "instruction,output\n", {}, "header.csv: empty file: no records", None),
    ("dict.json", '{"a": 1}', {}, "dict.json: a JSON source must hold a list of records, got dict", None),
    ("corrupt.parquet", b"PAR1 not really", {}, "corrupt.parquet: unreadable or corrupt parquet", None),
    ("data.txt", GOOD, {}, "data.txt: cannot tell the format from the file name", None),
]
# fmt: on


@functools.cache
def _special() -> re.Pattern | None:
    return special_token_pattern(AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())))


def _index(tmp_path: Path, name: str, content: str | bytes, keys: dict, bad_rows: str):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return index_source(SourceConfig(path=str(path), **keys), bad_rows, _special())


@pytest.mark.parametrize(
    "name,content,keys,fragment,skipped", PREP_SOURCE_CASES, ids=[c[0] for c in PREP_SOURCE_CASES]
)
def test_prep_source_error_names_file_row_field(tmp_path, name, content, keys, fragment, skipped):
    with pytest.raises(DataError, match=re.escape(fragment)):
        _index(tmp_path, name, content, keys, "error")


@pytest.mark.parametrize(
    "name,content,keys,fragment,skipped", PREP_SOURCE_CASES, ids=[c[0] for c in PREP_SOURCE_CASES]
)
def test_prep_source_skip_counts_and_reports(tmp_path, name, content, keys, fragment, skipped):
    if skipped is None:
        with pytest.raises(DataError, match=re.escape(fragment)):
            _index(tmp_path, name, content, keys, "skip")
        return
    src = _index(tmp_path, name, content, keys, "skip")
    assert sum(src.skipped.values()) == skipped and len(src) >= 1
    assert any(fragment in example for example in src.skip_examples), src.skip_examples


# ================================================================ data prep: config values
# (key=value overrides on top of one valid source, message fragment naming the key)
# fmt: off
PREP_CONFIG_CASES = [
    (["max_len=0"], "max_len must be >= 2"),
    (["shard_rows=0"], "shard_rows must be >= 1"),
    (["heldout_fraction=0"], "heldout_fraction must lie in (0, 1)"),
    (["heldout_fraction=1"], "heldout_fraction must lie in (0, 1)"),
    (["heldout_fraction=-0.1"], "heldout_fraction must lie in (0, 1)"),
    (["heldout_fraction=.nan"], "heldout_fraction must be a finite number"),
    (["bad_rows=ignore"], "'bad_rows': Invalid value 'ignore', expected one of [error, skip]"),
    (["overlong=cut"], "'overlong': Invalid value 'cut', expected one of [skip, truncate]"),
    (["output_root=''"], "output_root must name a folder"),
    (["label.max_segment_len=0"], "label.max_segment_len (K) must lie in 1..127"),
    (["label.max_segment_len=200"], "label.max_segment_len (K) must lie in 1..127"),
    (["label.batch_tokens=0"], "label.batch_tokens must be >= 1"),
    (["label.min_threshold=-1"], "label.min_threshold must be >= 0"),
    (["label.min_threshold=.nan"], "label.min_threshold must be a finite number"),
    (["label.ratio=1.5"], "label.ratio must lie in [0, 1]"),
    (["label.sliding_confidence=1"], "label.sliding_confidence must lie in [0.5, 1)"),
    (["label.small_group_confidence=0.2"], "label.small_group_confidence must lie in [0.5, 1)"),
    (["label.fixed_k=9"], "label.fixed_k must lie in 1..max_segment_len=4"),
    (["label.strategy=greedy"], "'label.strategy': Invalid value 'greedy', expected one of [decreasing_v2, decreasing, sliding, small_group, fixed]"),
    (["label.metric=logit"], "'label.metric': Invalid value 'logit', expected one of [entropy, prob]"),
    (["label.dtype=half"], "'label.dtype': Invalid value 'half', expected one of [auto, float32, bfloat16]"),
    (["sources=[]"], "sources: at least one source is needed"),
    (["sources=[{path: x.jsonl, weight: 0}]"], "sources.0.weight must be > 0"),
    (["sources=[{path: x.jsonl, weight: .nan}]"], "sources.0.weight must be a finite number"),
    (["sources=[{path: x.jsonl, hf_name: y}]"], "sources.0: set exactly one of path or hf_name"),
    (["sources=[{path: x.jsonl, format: xml}]"], "Invalid value 'xml', expected one of [auto, jsonl, json, parquet, csv, arrow]"),
    (["sources=[{path: x.jsonl, response_field: ''}]"], "sources.0.response_field is empty: a prompt-only source has no response to learn; set responses: regenerate"),
    (["sources=[{path: a/x.jsonl}, {path: b/x.jsonl}]"], "sources.1: name 'x' is also sources.0's"),
    (["sources=[{path: x.jsonl, filters: [{field: lang}]}]"], "sources.0.filters.0: set at least one of"),
    (["sources=[{path: x.jsonl, filters: [{equals: en}]}]"], "sources.0.filters.0.field must name"),
    (["sources=[{path: x.jsonl, filters: [{field: t, min_chars: -1}]}]"], "sources.0.filters.0.min_chars must be >= 0"),
    (["label.stratgy=fixed"], "label.stratgy"),
    (["max_len=1.5"], "max_len"),
    (["responses=regenerate", "generate.max_new_tokens=80000", "max_len=256"], "generate.max_new_tokens (80000) cannot fit in max_len (256)"),
    (["responses=regenerate", "generate.max_new_tokens=256", "max_len=256"], "generate.max_new_tokens (256) cannot fit in max_len (256)"),
]
# fmt: on


@pytest.mark.parametrize(
    "overrides,fragment", PREP_CONFIG_CASES, ids=[" ".join(c[0]) for c in PREP_CONFIG_CASES]
)
def test_prep_config_value_names_the_key(overrides, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_config(PrepConfig, None, ["sources=[{path: x.jsonl}]", *overrides])


# ================================================================ data prep: whole runs
# (JSONL rows as text, config keys, message fragment): runs that would give an untrainable prep.
# Which rows are held out hashes the (temporary) file path: a case must hold whatever the split.
# fmt: off
PREP_RUN_CASES = [
    ("".join(f'{{"instruction": "q{i}", "output": "a"}}\n' for i in range(5)), {"heldout_fraction": 1e-9}, "heldout_fraction=1e-09 held out none of the 5 rows"),
    ('{"instruction": "q"}\n' * 3, {"bad_rows": "skip"}, "no usable rows (3 read, skipped {'bad_row': 3})"),
    (('{"instruction": "q", "output": "' + "w " * 300 + '"}\n') * 12, {"max_len": 64, "heldout_fraction": 0.5}, "the train split has no rows after tokenisation (skipped: {'too_long': 12})"),
]
# fmt: on


@pytest.fixture(scope="module")
def prep_model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("bad_inputs") / "model", layers=1)


@pytest.mark.parametrize("rows,keys,fragment", PREP_RUN_CASES, ids=[c[2][:30] for c in PREP_RUN_CASES])
def test_prep_run_refuses_untrainable_output(prep_model, tmp_path, rows, keys, fragment):
    (tmp_path / "rows.jsonl").write_text(rows)
    source = SourceConfig(path=str(tmp_path / "rows.jsonl"))
    cfg = PrepConfig(model=str(prep_model), sources=[source], output_root=str(tmp_path / "out"), **keys)
    cfg.validate()
    with pytest.raises(ValueError, match=re.escape(fragment)):
        prepare(cfg)


def test_prep_refuses_a_base_family_it_would_label_differently(tmp_path):
    """Gemma 2 soft-caps its final logits; the scorer calls the LM head directly, so its
    boundaries would come from logits the base never produces: refused before any work."""
    import shutil

    import torch
    import transformers
    from conftest import TINY_SHAPE

    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma 2")
    tok_dir = smollm2_tokenizer_dir()
    cfg = transformers.Gemma2Config(
        **{**TINY_SHAPE, "vocab_size": len(AutoTokenizer.from_pretrained(str(tok_dir)))}
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "gemma2")
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp_path / "gemma2" / f.name)
    (tmp_path / "rows.jsonl").write_text(GOOD * 4)
    source = SourceConfig(path=str(tmp_path / "rows.jsonl"))
    with pytest.raises(ValueError, match="base model family 'gemma2' is not supported: .*softcapping"):
        prepare(
            PrepConfig(model=str(tmp_path / "gemma2"), sources=[source], output_root=str(tmp_path / "out"))
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


# ================================================================ label viewer
def test_label_view_names_a_folder_without_a_manifest(tmp_path):
    from data_prep.view import main

    with pytest.raises(SystemExit, match=r"\[label-view\] error: .*manifest.json: no manifest"):
        main([str(tmp_path)])
