"""ZeRO rank files as export and resume read them: every file named, every file checked."""

from __future__ import annotations

import pytest


def test_a_zero2_checkpoint_is_read_by_its_own_file_names(tmp_path):
    """Stage 1/2 write one full model file and a partition of the optimiser per rank; export and
    resume check exactly those (a missing optimiser partition is named)."""
    import torch

    from trainer.export.zero_files import ZeroFileError, rank_files, verify_zero_files

    ckpt = tmp_path / "checkpoints" / "step_000024"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text("step_000024")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": torch.zeros(2)}, ckpt / name)
    with pytest.raises(ZeroFileError, match=r"missing rank file zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        verify_zero_files(ckpt, 2)
    torch.save({"x": torch.zeros(2)}, ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    verify_zero_files(ckpt, 2)
    assert [p.name for p in rank_files(ckpt, 2)][0] == "mp_rank_00_model_states.pt"


class _Trap:
    """Unpickling this calls a function that writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.write_text, (self.marker, "code ran"))


def _zero3_checkpoint(tmp_path, world_size: int = 2):
    """A ZeRO-3 checkpoint folder of plain tensor files, as the restricted unpickler accepts."""
    import torch

    ckpt = tmp_path / "checkpoints" / "step_000008"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text(ckpt.name)
    for r in range(world_size):
        for kind in ("model_states", "optim_states"):
            torch.save({"x": torch.zeros(2)}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt")
    return ckpt


def test_a_clean_checkpoint_passes(tmp_path):
    from trainer.export.zero_files import verify_zero_files

    verify_zero_files(_zero3_checkpoint(tmp_path), 2)


@pytest.mark.parametrize(
    "extra",
    [
        "zero_pp_rank_2_mp_rank_00_model_states.pt",  # a rank this 2-rank run never had
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",  # a second file for rank 0
        "mp_rank_00_model_states.pt",  # a stage-1/2 model file beside stage-3 partitions
        "notes.pkl",
    ],
)
def test_an_extra_file_beside_the_rank_files_is_refused_by_name_and_never_unpickled(tmp_path, extra):
    """DeepSpeed globs every *_model_states.pt / *_optim_states.pt of the folder and unpickles it
    freely: a file the checkpoint should not hold is refused before anything reads it."""
    import torch

    from trainer.export.zero_files import ZeroFileError, verify_loadable, verify_zero_files

    ckpt = _zero3_checkpoint(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"module": _Trap(marker)}, ckpt / extra)
    for check in (verify_zero_files, verify_loadable):
        with pytest.raises(ZeroFileError, match=rf"{extra.replace('.', '[.]')} is not a file of this 2-rank"):
            check(ckpt, 2)
    assert not marker.exists()


@pytest.mark.parametrize(
    "victim",
    [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ],
)
def test_a_crafted_file_in_any_rank_position_is_refused_and_runs_no_code(tmp_path, victim):
    import torch

    from trainer.export.zero_files import ZeroFileError, verify_loadable

    ckpt = _zero3_checkpoint(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"module": _Trap(marker)}, ckpt / victim)
    with pytest.raises(ZeroFileError, match=rf"{victim.replace('.', '[.]')}: refused.*GLOBAL"):
        verify_loadable(ckpt, 2)
    assert not marker.exists()


def test_a_crafted_stage2_model_file_is_refused_on_resume(tmp_path):
    """Resume reads stage-1/2 checkpoints too: their one model file passes the same check."""
    import torch

    from trainer.export.zero_files import ZeroFileError, verify_loadable

    ckpt = tmp_path / "step_000002"
    ckpt.mkdir()
    marker = tmp_path / "MARKER"
    torch.save({"module": _Trap(marker)}, ckpt / "mp_rank_00_model_states.pt")
    for r in range(2):
        torch.save({"x": torch.zeros(2)}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    with pytest.raises(ZeroFileError, match=r"mp_rank_00_model_states[.]pt: refused"):
        verify_loadable(ckpt, 2)
    assert not marker.exists()


def test_a_missing_rank_file_is_named(tmp_path):
    from trainer.export.zero_files import ZeroFileError, verify_loadable

    ckpt = _zero3_checkpoint(tmp_path)
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ZeroFileError, match=r"missing rank file zero_pp_rank_1_mp_rank_00_optim_states[.]pt"):
        verify_loadable(ckpt, 2)
