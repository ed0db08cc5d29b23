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
