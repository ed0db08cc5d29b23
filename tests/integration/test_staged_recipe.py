"""A staged recipe through the launcher (2 ranks, ZeRO-3): phases run in order in one job, each
starting from the previous phase's weights, all in one MLflow run; rerunning it trains nothing."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from launcher import launch

pytestmark = pytest.mark.distributed

RECIPE = """
phases:
  - name: warm
    steps: 2
    overrides: [model.hamburger.align_weight=1.0]
  - name: hold
    steps: 2
    overrides: [model.base_training=frozen, optim.lr_new=0, optim.min_lr=0]
"""


def test_phases_chain_their_weights_and_share_one_mlflow_run(setup, tmp_path):
    from safetensors.torch import load_file

    from hamburger.model import load_model
    from trainer.export.export import export

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(setup["cfg"].read_text() + RECIPE)
    out = tmp_path / "staged"
    proc = launch(recipe, f"output_dir={out}", "eval_every=0", "save_every=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warm, hold = out / "phase1-warm", out / "phase2-hold"
    records = [json.loads(line) for line in (warm / "metrics.jsonl").read_text().splitlines()]
    assert any("align" in r["metrics"] and r["metrics"]["align"] > 0 for r in records)
    assert [
        r["step"]
        for r in map(json.loads, (hold / "metrics.jsonl").read_text().splitlines())
        if "loss" in r["metrics"]
    ] == [3, 4]

    # phase 2 trained nothing (base frozen, lr_new 0), so it must hold phase 1's weights exactly:
    # the ZeRO-3-partitioned base written by rank 0 and the whole grafted modules on every rank
    first = load_model(export(str(warm), str(tmp_path / "warm"))["path"]).state_dict()
    second = load_model(export(str(hold), str(tmp_path / "hold"))["path"]).state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name
    base = load_file(str(setup["base"] / "model" / "model.safetensors"))
    moved = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[f"base.{moved}"], base[moved]), "phase 1 trained the base: a real copy"

    db = sqlite3.connect(out / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 1
    steps = sorted(r[0] for r in db.execute("select step from metrics where key='loss'"))
    assert steps == [1, 2, 3, 4]
    assert db.execute("select value from tags where key='phase'").fetchone()[0] == "hold"
    params = dict(db.execute("select key, value from params").fetchall())
    assert params["phase.1.warm.model.hamburger.align_weight"] == "1.0"
    assert params["phase.2.hold.model.base_training"] == "frozen" and params["phase.2.hold.first_step"] == "3"
    artifacts = (out / "mlartifacts").rglob("config.yaml")
    assert {p.parent.name for p in artifacts} == {"phase1-warm", "phase2-hold"}  # each phase's own

    again = launch(recipe, f"output_dir={out}", "eval_every=0", "save_every=2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("this run is finished, nothing to do") == 2
    assert sorted(r[0] for r in db.execute("select step from metrics where key='loss'")) == [1, 2, 3, 4]
