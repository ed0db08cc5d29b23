"""Faults a careful user hits on the training side, on the session's run trained through the
deepspeed launcher: nothing lost, nothing stale, nothing silent.

Each test names the point it proves (export overwrite, stale temporaries, crafted checkpoints,
resume into a run with other data, artifacts beside the run store). The faults that need no
launched run sit with their component: data that does not fit the model in
tests/trainer/train/test_runcheck.py, model-written code in tests/trainer/evaluate/test_evaluate.py,
a ZeRO-2 checkpoint in tests/trainer/export/test_zero_files.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from trainer.export.export import EXPORT_MARKER, ExportError, export

pytestmark = pytest.mark.distributed


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_overwrite_never_deletes_the_run_or_foreign_folders(baseline, tmp_path):
    before = _snapshot(baseline)
    for target in (baseline, baseline.parent, baseline / "checkpoints"):
        with pytest.raises(ExportError, match="source run"):
            export(str(baseline), str(target), overwrite=True)
    assert _snapshot(baseline) == before  # checkpoints, mlflow.db, metrics.jsonl all still there

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not a previous export"):
        export(str(baseline), str(foreign), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"

    out = tmp_path / "exp"
    export(str(baseline), str(out))
    assert (out / EXPORT_MARKER).is_file()
    (out / "stale.txt").write_text("from the previous export")
    export(str(baseline), str(out), overwrite=True)  # a previous export is replaced whole
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert not list(tmp_path.glob("exp.tmp-*"))


def test_out_that_is_a_file_is_named(baseline, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match=r"--out .*f: is a file"):
        export(str(baseline), str(tmp_path / "f"))


def test_killed_export_leaves_no_temporary_folder_behind(baseline, tmp_path):
    dead = tmp_path / "exp.tmp-999999999-abc"  # no such pid: an export killed mid-write
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 1024)
    alive = tmp_path / f"exp.tmp-{os.getpid()}-xyz"  # a running export's folder is left alone
    alive.mkdir()
    export(str(baseline), str(tmp_path / "exp"))
    assert not dead.exists() and alive.is_dir()


class _Trap:
    """Unpickling this calls a function that writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_crafted_checkpoint_runs_no_code_during_export(baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")
    marker = tmp_path / "MARKER"
    victim = run / "checkpoints" / "step_000008" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    torch.save({"module": _Trap(marker)}, victim)
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt: refused.*GLOBAL"):
        export(str(run), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra", ["zero_pp_rank_2_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_an_extra_crafted_rank_file_runs_no_code_on_export(baseline, tmp_path, extra):
    """DeepSpeed unpickles every *_states.pt of the folder: a file beside the real ones is refused
    by name before any of them is read."""
    run = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")
    marker = tmp_path / "MARKER"
    torch.save({"module": _Trap(marker)}, run / "checkpoints" / "step_000008" / extra)
    with pytest.raises(
        ExportError, match=rf"{extra.replace('.', '[.]')} is not a file of this 2-rank checkpoint"
    ):
        export(str(run), str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "victim, refused",
    [
        ("zero_pp_rank_2_mp_rank_00_model_states.pt", " is not a file of this 2-rank checkpoint"),  # extra
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", ": refused"),  # a real one replaced
    ],
)
def test_a_crafted_rank_file_runs_no_code_on_resume(setup, baseline, tmp_path, victim, refused):
    """`resume=PATH` reads every file DeepSpeed will open with the restricted unpickler first, and
    refuses a file the checkpoint should not hold, by name; the crafted code never runs."""
    from launcher import launch

    run = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step_000008"
    marker = tmp_path / "MARKER"
    torch.save({"module": _Trap(marker)}, ckpt / victim)
    proc = launch(setup["cfg"], f"output_dir={tmp_path / 'resumed'}", f"resume={ckpt}", "max_steps=10")
    assert proc.returncode != 0
    assert f"{victim}{refused}" in proc.stdout + proc.stderr
    assert not marker.exists()


def test_two_exports_to_one_out_never_both_succeed(baseline, tmp_path, monkeypatch):
    """Another export finishes at --out while this one writes: this one fails, naming --overwrite,
    and the other's folder is left as it was."""
    from hamburger.model import folder

    out = tmp_path / "exp"
    real = folder.save_weights

    def racing(path, *a, **kw):
        names = real(path, *a, **kw)
        out.mkdir()
        (out / "from-the-other-export").write_text("x")
        return names

    monkeypatch.setattr(folder, "save_weights", racing)
    with pytest.raises(
        ExportError, match=r"was written by another export while this one ran; pass --overwrite"
    ):
        export(str(baseline), str(out))
    assert [p.name for p in out.iterdir()] == ["from-the-other-export"]
    assert not list(tmp_path.glob("exp.tmp-*"))


def test_an_export_on_a_full_disk_says_so_naming_the_folder(baseline, tmp_path, monkeypatch):
    import errno

    from hamburger.io import DiskFullError
    from hamburger.model import folder

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder, "save_weights", full)
    with pytest.raises(
        DiskFullError, match=rf"no space left on the device holding {tmp_path} while writing the export"
    ):
        export(str(baseline), str(tmp_path / "exp"))
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob("exp.tmp-*"))


def test_truncated_rank_file_is_named(baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")
    f = run / "checkpoints" / "step_000008" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt: refused"):
        export(str(run), str(tmp_path / "out"))


def test_marker_records_the_source(baseline, tmp_path):
    out = Path(export(str(baseline), str(tmp_path / "e"), base_only=True)["path"])
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["step"] == 8 and marker["base_only"] is True and "step_000008" in marker["checkpoint"]


# ---------------------------------------------------------------- resume into a run with other data
def test_resume_into_a_run_with_other_data_is_refused_and_leaves_it_untouched(setup, baseline, tmp_path):
    from helpers import write_jsonl
    from launcher import launch

    from data_prep.config import LabelConfig, PrepConfig, SourceConfig
    from data_prep.run import prepare

    rows = [{"instruction": f"Say {i} twice.", "output": f"{i} {i}"} for i in range(40)]
    other = prepare(
        PrepConfig(
            model=str(setup["base"] / "model"),
            sources=[SourceConfig(path=str(write_jsonl(tmp_path / "twice.jsonl", rows)))],
            output_root=str(tmp_path / "prep"),
            heldout_fraction=0.15,
            shard_rows=16,
            label=LabelConfig(strategy="fixed", fixed_k=2),
        )
    )
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = launch(setup["cfg"], f"output_dir={run}", f"data.path={other}")
    assert proc.returncode != 0
    assert "belongs to another job" in proc.stderr and "data: checkpoint trained on prep" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten

    # The same job again: the run is finished, nothing is retrained, logged or re-saved.
    proc = launch(setup["cfg"], f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this run is finished" in proc.stdout
    assert (run / "metrics.jsonl").read_bytes() == before[run / "metrics.jsonl"]


# ---------------------------------------------------------------- hygiene: artifacts
def test_run_artifacts_stay_beside_the_run_store(baseline):
    import mlflow

    info = json.loads((baseline / "run_info.json").read_text())
    run = mlflow.MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    assert run.info.artifact_uri.startswith((baseline / "mlartifacts").resolve().as_uri())
    assert (baseline / "mlartifacts").is_dir()
    root = Path(__file__).resolve().parents[2]  # the folder training was launched from
    assert not list(root.glob(f"mlruns/*/{info['run_id']}")), "the run's artifacts left its output folder"
