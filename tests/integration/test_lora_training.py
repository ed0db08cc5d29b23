"""model.base_training: lora under ZeRO-3 on 2 CPU ranks: adapters train while the base's weights
do not move, a resumed run gives the uninterrupted run's losses, and the export (adapters merged
into the weights) decodes the same tokens as the run's own adapted model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from launcher import launch, losses

pytestmark = pytest.mark.distributed

LORA = ("model.base_training=lora", "model.lora.rank=4", "model.lora.alpha=8", "max_steps=4", "eval_every=0")


def test_lora_resumes_exactly_and_its_export_decodes_as_the_run_did(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    from hamburger.decode import generate
    from hamburger.model import HAMburgerConfig, HAMburgerModel, load_model
    from hamburger.model.adapter import BaseMismatch
    from hamburger.model.lora import LoraSettings, add_lora
    from trainer.export.export import consolidated, export
    from trainer.train.checkpoint import CheckpointInfo

    whole = tmp_path / "whole"
    proc = launch(setup["cfg"], f"output_dir={whole}", *LORA)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line)["metrics"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any("lr_lora" in m for m in logged) and not any("lr_base" in m for m in logged)

    resumed = tmp_path / "resumed"
    step2 = whole / "checkpoints" / "step_000002"
    proc = launch(setup["cfg"], f"output_dir={resumed}", f"resume={step2}", *LORA)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = losses(whole), losses(resumed)
    # the checkpoint's MLflow run lives in the other folder's store: a new run here continues it
    db = sqlite3.connect(resumed / "mlflow.db")
    tags = dict(db.execute("select key, value from tags").fetchall())
    assert tags["continues_run_id"] == json.loads((whole / "run_info.json").read_text())["run_id"]
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in (3, 4)), (a, b)

    ckpt = whole / "checkpoints" / "step_000004"
    info = CheckpointInfo.read(ckpt)
    assert info.base_training == "lora" and info.lora["rank"] == 4
    state = {k: v.contiguous() for k, v in consolidated(ckpt).items()}
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in state.items()), "the adapters trained"
    run_model = HAMburgerModel.from_base(
        str(setup["base"] / "model"), HAMburgerConfig.from_dict(info.hamburger)
    )
    add_lora(run_model.base, LoraSettings(**info.lora))
    run_model.load_state_dict(state, strict=True)
    run_model.eval()
    base_before = run_model.base.state_dict()

    exported = load_model(export(str(whole), str(tmp_path / "export"))["path"])
    prompt = [5, 17, 33, 8, 61, 12, 40]
    with torch.no_grad():
        for confidence in (0.5, 0.9):
            assert (
                generate(exported, prompt, 20, confidence).tokens
                == generate(run_model, prompt, 20, confidence).tokens
            )
    # the adapter folder: the grafted modules and LoRA pairs only, put onto the base when loaded
    folder = Path(export(str(whole), str(tmp_path / "adapter"), adapter=True)["path"])
    meta = json.loads((folder / "config.json").read_text())
    assert meta["adapter"]["base"] == str(setup["base"] / "model") and meta["adapter"]["lora"]["rank"] == 4
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size < 0.5 * sum(f.stat().st_size for f in (tmp_path / "export").glob("*.safetensors"))
    on_base = load_model(folder)
    with torch.no_grad():
        assert generate(on_base, prompt, 20, 0.5).tokens == generate(run_model, prompt, 20, 0.5).tokens
    other = tmp_path / "other_base"
    shutil.copytree(setup["base"] / "model", other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BaseMismatch, match=r"an adapter for base .* but .*other_base.* has weights"):
        load_model(folder, base=str(other))

    # the base's own weights beside the adapters are exactly the ones it started from
    for name, tensor in load_file(str(setup["base"] / "model" / "model.safetensors")).items():
        key = name if name in base_before else name.removesuffix("weight") + "base_layer.weight"
        assert torch.equal(base_before[key].to(tensor.dtype), tensor), name
