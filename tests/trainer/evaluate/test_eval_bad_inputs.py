"""The eval stage's part of the bad-input matrix: config values, prompt files and the command's
missing model, one case per line, and the message fragment the user must see (it names the file,
the line and the field or key). A new case is one line in its table."""

from __future__ import annotations

import re

import pytest

from hamburger.configio import load_config

# ================================================================ eval: config values
# (key=value overrides, message fragment naming the key); each case gets model=x first
# fmt: off
EVAL_CONFIG_CASES = [
    (["max_new_tokens=0"], "'max_new_tokens': must be >= 1"),
    (["max_new_tokens=-3"], "'max_new_tokens': must be >= 1"),
    (["max_prompts=0"], "'max_prompts': must be >= 1"),
    (["code_timeout_s=0"], "'code_timeout_s': must be > 0"),
    (["confidences=[0]"], "confidences must lie in (0, 1]"),
    (["batch_sizes=[0]"], "batch_sizes must be >= 1"),
    (["dtype=half"], "'dtype': Invalid value 'half', expected one of [auto, float32, bfloat16]"),
    (["decode=fast"], "'decode': Invalid value 'fast', expected one of [eager, static, graphed]"),
]
# fmt: on


@pytest.mark.parametrize(
    "overrides,fragment", EVAL_CONFIG_CASES, ids=[" ".join(c[0]) for c in EVAL_CONFIG_CASES]
)
def test_eval_config_value_names_the_key(overrides, fragment):
    from trainer.evaluate.config import EvalConfig

    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_config(EvalConfig, None, ["model=x", *overrides])


# ================================================================ eval prompt files
# (file bytes, message fragment: it names the file, the line and the field)
# fmt: off
EVAL_PROMPT_CASES = [
    (b'{"prompt": "hi"}\n{not json\n', "p.jsonl: line 2: not JSON"),
    (b'[{"prompt": "hi"}]\n', "p.jsonl: line 1: expected a JSON object, got list"),
    (b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n', "p.jsonl: line 2: not UTF-8 text"),
    (b'{"prompt": null}\n', "p.jsonl: line 1: field 'prompt' must be a non-empty string"),
    (b'{"text": "hi"}\n', "p.jsonl: line 1: field 'prompt' must be a non-empty string"),
    (b'{"prompt": "  "}\n', "p.jsonl: line 1: field 'prompt' must be a non-empty string"),
    (b'{"prompt": "hi", "answer": 3}\n', "p.jsonl: line 1: field 'answer' must be a string"),
    (b"\n\n", "p.jsonl: no prompts"),
]
# fmt: on


@pytest.mark.parametrize("content,fragment", EVAL_PROMPT_CASES, ids=[c[1][9:40] for c in EVAL_PROMPT_CASES])
def test_eval_prompt_file_error_names_file_line_field(tmp_path, content, fragment):
    from trainer.evaluate.prompts import read_prompt_records

    (tmp_path / "p.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        read_prompt_records(tmp_path / "p.jsonl")


def test_eval_command_names_a_missing_model_without_a_traceback(tmp_path):
    from trainer.evaluate.evaluate import main

    with pytest.raises(SystemExit, match=r"\[eval\] error: .*nope: no such run or checkpoint folder"):
        main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"\[eval\] config error: .*'max_new_tokens': must be >= 1"):
        main([str(tmp_path / "nope"), "max_new_tokens=0"])
