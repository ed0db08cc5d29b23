"""The run check before training: data that does not fit the model is refused naming why
(labelled with a larger K, prepared with another tokenizer, ids outside the vocabulary).

These use the session's prepared data (the `setup` fixture prepares in this process and launches
nothing; the launched run is `baseline`)."""

from __future__ import annotations

import json

import pytest


def _samples(folder):
    """The largest token id of the train split, what the vocabulary check reads."""
    from trainer.train.sample_store import open_samples

    return open_samples(folder, "train").max_token


def test_data_labelled_with_a_larger_k_is_refused_before_training(setup):
    from hamburger.model import HAMburgerConfig
    from trainer.train.runcheck import RunMismatch, check_data_fits_model

    model = str(setup["base"] / "model")
    assert check_data_fits_model(setup["data"], model, HAMburgerConfig(), _samples(setup["data"])) == []
    with pytest.raises(RunMismatch, match=r"labelled with K=4 .* model\.hamburger\.max_segment_len=2"):
        check_data_fits_model(
            setup["data"], model, HAMburgerConfig(max_segment_len=2), _samples(setup["data"])
        )


def test_data_from_another_tokenizer_is_refused(setup, tmp_path):
    from helpers import tiny_model_dir

    from hamburger.model import HAMburgerConfig
    from trainer.train.runcheck import RunMismatch, check_data_fits_model

    # Same vocabulary size, two entries swapped: training would run, on the wrong tokens.
    other = tiny_model_dir(tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RunMismatch, match=r"vocabulary differs from the model's"):
        check_data_fits_model(setup["data"], str(other), HAMburgerConfig(), _samples(setup["data"]))

    # A smaller vocabulary: ids in the shards fall outside it (an IndexError mid-step before).
    small = tiny_model_dir(tmp_path / "small")
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 64
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunMismatch, match=r"outside the model's vocabulary of 64 ids"):
        check_data_fits_model(setup["data"], str(small), HAMburgerConfig(), _samples(setup["data"]))
