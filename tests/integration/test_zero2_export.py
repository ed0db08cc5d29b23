"""A ZeRO stage-2 run resumes and exports like a stage-3 one: the consolidated weights are the
trained ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launcher import ROOT, launch

pytestmark = pytest.mark.distributed


def test_a_zero2_checkpoint_exports_its_trained_weights(setup, tmp_path):
    from safetensors.torch import load_file

    from trainer.export.export import export
    from trainer.export.zero_files import _safe_globals

    ds = json.loads((ROOT / "ds_configs" / "zero2_cpu.json").read_text())
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    proc = launch(
        setup["cfg"],
        f"output_dir={out}",
        f"ds_config={tmp_path / 'zero2.json'}",
        "max_steps=2",
        "eval_every=0",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "mp_rank_00_model_states.pt").is_file()  # really stage 2: one model file
    folder = Path(export(str(out), str(tmp_path / "exp"))["path"])
    with torch.serialization.safe_globals(_safe_globals()):
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)[
            "module"
        ]
    exported = load_file(str(folder / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor, module[name].float()), name  # fp32 on CPU: the very weights trained
    base = load_file(str(setup["base"] / "model" / "model.safetensors"))
    assert not torch.equal(exported["base.model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    # its optimiser files (fragment addresses) pass the restricted unpickler: the run resumes
    proc = launch(
        setup["cfg"],
        f"output_dir={out}",
        f"ds_config={tmp_path / 'zero2.json'}",
        "max_steps=3",
        "eval_every=0",
    )
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
