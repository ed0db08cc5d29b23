"""ZeRO rank files as export reads them: a checkpoint of another ZeRO stage is named as such."""

from __future__ import annotations

import pytest


def test_a_zero2_checkpoint_is_named_not_reported_as_missing_files(tmp_path):
    """Export reads ZeRO-3 rank files; a stage-1/2 checkpoint (one mp_rank_00 model file) is
    refused naming the stage, not as a mysteriously missing rank file."""
    from trainer.export.zero_files import ZeroFileError, verify_zero_files

    ckpt = tmp_path / "checkpoints" / "step_000024"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text("step_000024")
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(ZeroFileError, match="ZeRO stage 1 or 2"):
        verify_zero_files(ckpt, 2)
