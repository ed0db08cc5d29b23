"""Options and stored defaults that would make every request fail are refused at start,
naming the option or the file (a queue of 0 would answer only 429s)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import tiny_hamburger_dir

from trainer.serve.config import ServeConfig
from trainer.serve.loader import generation_defaults, load, load_for_serving


@pytest.mark.parametrize(
    "field, value, option",
    [
        ("max_queue", 0, "--max-queue"),
        ("max_batch", 0, "--max-batch"),
        ("max_tokens_cap", 0, "--max-tokens-cap"),
        ("timeout_s", 0.0, "--timeout-s"),
        ("timeout_s", float("inf"), "--timeout-s"),
        ("port", 70000, "--port"),
        ("confidence", 5.0, "--confidence"),
        ("confidence", 0.0, "--confidence"),
        ("threads", -1, "--threads"),
        ("dtype", "float8", "--dtype"),
    ],
)
def test_nonsensical_server_options_are_refused_naming_the_option(field, value, option):
    with pytest.raises(ValueError, match=rf"serve {option}: must be"):
        ServeConfig(model="m", **{field: value}).validate()


def test_the_default_server_options_pass():
    ServeConfig(model="m").validate()


def test_serve_cli_refuses_a_zero_queue_before_loading_the_model(tmp_path):
    from trainer.serve.app import main

    with pytest.raises(SystemExit, match=r"\[serve\] error: serve --max-queue: must be an integer >= 1"):
        main([str(tmp_path / "no-such-model"), "--max-queue", "0"])


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"confidence": 5}, r"confidence must be a number in \(0, 1\], got 5"),
        ({"confidence": 0}, r"confidence must be a number in \(0, 1\], got 0"),
        ({"confidence": "0.5"}, r"confidence must be a number"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1"),
        ([1, 2], r"must hold a JSON object"),
        ("{not json", r"not valid JSON"),
    ],
)
def test_generation_config_is_checked_where_it_is_read(tmp_path, content, fragment):
    """An export's generation_config.json written by hand (or by an old export that accepted
    --confidence 5) is refused by name, not served as every request's default."""
    path = tmp_path / "generation_config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=rf"generation_config\.json.*{fragment}|{fragment}"):
        generation_defaults(tmp_path)
    with pytest.raises(ValueError, match="generation_config.json"):
        generation_defaults(tmp_path)


@pytest.fixture(scope="module")
def ham_folder(tmp_path_factory):
    return tiny_hamburger_dir(tmp_path_factory.mktemp("opts") / "ham")


@pytest.mark.parametrize("reader", ["serve", "load"])
def test_every_loader_refuses_a_bad_stored_confidence(ham_folder, tmp_path, reader):
    """serve and the pyfunc read through load_for_serving, Python users through load()."""
    folder = tmp_path / "m"
    shutil.copytree(ham_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"confidence": 5, "eos_token_id": 2}))
    with pytest.raises(
        ValueError, match=r"m/generation_config\.json: confidence must be a number in \(0, 1\]"
    ):
        load_for_serving(str(folder)) if reader == "serve" else load(str(folder))
