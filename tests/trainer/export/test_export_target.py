"""Where an export may go: never inside a run's checkpoints folder, which training prunes."""

from __future__ import annotations

import pytest

from trainer.export.export import ExportError, check_output_folder
from trainer.train.checkpoint import COMPLETE


def _run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000008"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE).write_text("{}")
    return ckpt


@pytest.mark.parametrize("target", ["checkpoints/best", "checkpoints/exports/v1"])
def test_an_export_inside_the_runs_checkpoints_folder_is_refused(tmp_path, target):
    ckpt = _run(tmp_path)
    out = tmp_path / "run" / target
    with pytest.raises(
        ExportError, match=r"lies inside a run's checkpoints folder .*export to a folder outside"
    ):
        check_output_folder(out, ckpt, overwrite=False)
    assert not out.exists()


def test_an_export_beside_the_checkpoints_is_allowed(tmp_path):
    ckpt = _run(tmp_path)
    check_output_folder(tmp_path / "run" / "export", ckpt, overwrite=False)
    check_output_folder(
        tmp_path / "elsewhere" / "checkpoints" / "x", ckpt, overwrite=False
    )  # no step folders


@pytest.mark.parametrize("confidence", [0, 0.0, -0.5, 5, 1.01, float("nan")])
def test_export_confidence_outside_zero_one_is_refused(tmp_path, confidence):
    """The export writes the serving default; one rule with the request check: (0, 1]."""
    from trainer.export.export import export

    with pytest.raises((ExportError, ValueError), match=r"confidence"):
        export(str(tmp_path / "no-such-run"), str(tmp_path / "out"), confidence=confidence)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["2 gigs", "0GB", "-5", "GB", "", "2G", "1.5TiB"])
def test_a_bad_max_shard_size_is_named_before_any_work(tmp_path, size, capsys):
    from trainer.export.export import check_shard_size, main

    with pytest.raises(ExportError, match=r"--max-shard-size .*give a size above 0 such as 2GB"):
        check_shard_size(size)
    with pytest.raises(SystemExit):  # before the source is even looked at
        main([str(tmp_path / "no-such-run"), "--out", str(tmp_path / "o"), "--max-shard-size", size])
    assert "--max-shard-size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "size, parsed", [("2GB", "2GB"), ("500mb", "500mb"), ("1000000", 1000000), (4096, 4096)]
)
def test_good_shard_sizes_pass(size, parsed):
    from trainer.export.export import check_shard_size

    assert check_shard_size(size) == parsed
