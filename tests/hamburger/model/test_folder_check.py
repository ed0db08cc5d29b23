"""An incomplete or inconsistent model folder is refused naming the folder and the file at
fault, the same way from every loader: load(), serve (its loader and its command), eval, and the
check prep and train run on model.base."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import tiny_hamburger_dir

from hamburger.model.folder_check import ModelFolderError, check_model_folder


def _edit_config(d, change):
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(f, keep):
    f.write_bytes(f.read_bytes()[:keep])


def _drop_tokenizer(d):
    for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"):
        (d / f).unlink(missing_ok=True)


# (mutation, message fragment; "{d}" is the folder) for any model folder
COMMON = [
    (lambda d: (d / "config.json").write_text("{not json"), "{d}/config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1]"), "{d}/config.json: must hold a JSON object"),
    (lambda d: (d / "config.json").unlink(), "{d}: no config.json"),
    (lambda d: _edit_config(d, lambda c: c.pop("model_type")), "{d}/config.json: no model_type"),
    (_drop_tokenizer, "{d}: no tokenizer files"),
    (
        lambda d: _truncate(d / "model.safetensors", 1000),
        "{d}/model.safetensors: not a readable safetensors file",
    ),
    (
        lambda d: _truncate(d / "model.safetensors", 100_000),
        "{d}/model.safetensors: not a readable safetensors file",
    ),
    (
        lambda d: (d / "model.safetensors").unlink(),
        "{d}: no model.safetensors or model.safetensors.index.json",
    ),
]
# only for an export (model_type hamburger)
HAMBURGER = [
    (
        lambda d: _edit_config(d, lambda c: c.pop("hamburger")),
        "{d}/config.json: the `hamburger` block is missing",
    ),
    (
        lambda d: _edit_config(d, lambda c: c.update(hamburger=[1])),
        "{d}/config.json: the `hamburger` block is missing or not an object (got list)",
    ),
    (
        lambda d: _edit_config(d, lambda c: c["hamburger"].update(max_segment_len="four")),
        "{d}/config.json: hamburger.max_segment_len is 'four', expected an integer",
    ),
    (
        lambda d: _edit_config(d, lambda c: c["hamburger"].update(stop_weight=None)),
        "{d}/config.json: hamburger.stop_weight is None, expected a number",
    ),
    (
        lambda d: _edit_config(d, lambda c: c["hamburger"].update(micro_layers=0)),
        "{d}/config.json: hamburger.micro_layers must be >= 1",
    ),
    (
        lambda d: _edit_config(d, lambda c: c["hamburger"].update(bogus=1)),
        "{d}/config.json: unknown hamburger config keys: ['bogus']",
    ),
    (lambda d: _edit_config(d, lambda c: c.pop("base_config")), "{d}/config.json: `base_config` missing"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    ham = tiny_hamburger_dir(root / "ham")
    (ham / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return {"base": root / "ham-base", "ham": ham}


def _load(p):
    from trainer.serve.loader import load

    load(str(p))


def _serve_loader(p):
    from trainer.serve.loader import load_for_serving

    load_for_serving(str(p))


def _serve_command(p):
    from trainer.serve.app import main

    try:
        main([str(p), "--port", "0"])
    except SystemExit as e:
        raise ModelFolderError(str(e)) from None


def _eval_command(p):
    from trainer.evaluate.evaluate import main

    try:
        main([str(p), f"output_dir={p.parent / 'eval_out'}"])
    except SystemExit as e:
        raise ModelFolderError(str(e)) from None


HAM_LOADERS = {"load": _load, "serve": _serve_loader, "serve command": _serve_command, "eval": _eval_command}
BASE_LOADERS = {
    "serve": _serve_loader,
    "serve command": _serve_command,
    "prep/train model.base": check_model_folder,
}


def _cases(loaders, mutations):
    return [
        pytest.param(name, mutate, fragment, id=f"{name}: {fragment[4:50]}")
        for name in loaders
        for mutate, fragment in mutations
        if not (name == "eval" and "no config.json" in fragment)  # eval reads a folder without one as a run
    ]


@pytest.mark.parametrize("loader, mutate, fragment", _cases(HAM_LOADERS, COMMON + HAMBURGER))
def test_an_export_folder_at_fault_is_named_by_every_loader(folders, tmp_path, loader, mutate, fragment):
    d = tmp_path / "m"
    shutil.copytree(folders["ham"], d)
    mutate(d)
    with pytest.raises((ModelFolderError, FileNotFoundError), match=re.escape(fragment.format(d=d))):
        HAM_LOADERS[loader](d)


@pytest.mark.parametrize("loader, mutate, fragment", _cases(BASE_LOADERS, COMMON))
def test_a_base_folder_at_fault_is_named_by_every_loader(folders, tmp_path, loader, mutate, fragment):
    d = tmp_path / "b"
    shutil.copytree(folders["base"], d)
    mutate(d)
    with pytest.raises((ModelFolderError, FileNotFoundError), match=re.escape(fragment.format(d=d))):
        BASE_LOADERS[loader](d)


def test_a_sharded_folder_missing_a_shard_is_named(folders, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folders["ham"], d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelFolderError, match=r"index\.json: names model-00002-of-00002\.safetensors, which is not in"
    ):
        check_model_folder(d)


def test_whole_folders_and_hub_names_pass(folders):
    assert check_model_folder(folders["ham"])["model_type"] == "hamburger"
    assert check_model_folder(folders["base"])["model_type"] == "llama"
    assert check_model_folder("some-org/some-model") is None  # a hub id: transformers reports hub errors
