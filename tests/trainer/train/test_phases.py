"""init_from (a staged recipe's next phase, or a user's warm start) takes the checkpoint export
would take, verified the same way, and refuses anything else naming init_from."""

from __future__ import annotations

import pytest

from trainer.train.phases import initial_state


def test_init_from_without_a_usable_checkpoint_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"init_from=.*nowhere: .*no such run or checkpoint folder"):
        initial_state(str(tmp_path / "nowhere"), "builtin:smollm2", [])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"init_from=.*run: .*the run has no complete checkpoint"):
        initial_state(str(run), "builtin:smollm2", [])
    half = run / "checkpoints" / "step_000004"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"incomplete checkpoint|no complete checkpoint"):
        initial_state(str(half), "builtin:smollm2", [])
