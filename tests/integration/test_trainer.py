"""The trainer through the real deepspeed launcher on CPU: 2 ranks, ZeRO-3, tiny random Llama."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launcher import env, free_port, launch, losses

from trainer.train.tracking import replay

pytestmark = pytest.mark.distributed


def test_two_ranks_zero3_trains_and_tracks(baseline):
    ls = losses(baseline)
    assert sorted(ls) == list(range(1, 9))
    assert (ls[7] + ls[8]) / 2 < (ls[1] + ls[2]) / 2 - 0.5, ls
    final = json.loads((baseline / "final_metrics.json").read_text())
    for key in (
        "eval/loss",
        "eval/perplexity",
        "eval/token_acc_slot1",
        "eval/token_acc_slot3",
        "eval/stop_acc",
        "eval/expected_tokens_per_step",
    ):
        assert key in final
    ckpts = sorted(p.name for p in (baseline / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_000006", "step_000008"]  # keep_last=2
    assert all((baseline / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    run_id = json.loads((baseline / "run_info.json").read_text())["run_id"]
    db = sqlite3.connect(baseline / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 1  # one run, not one per rank
    assert db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0] == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    assert params["optim.lr_base"] == "0.003" and params["world_size"] == "2"
    assert params["ds.zero_optimization.stage"] == "3" and params["data_manifest.strategy"] == "fixed"
    steps = [r[0] for r in db.execute("select step from metrics where run_uuid=? and key='loss'", (run_id,))]
    assert sorted(steps) == list(range(1, 9))
    assert (
        db.execute("select count(*) from metrics where key='eval/expected_tokens_per_step'").fetchone()[0]
        >= 2
    )
    artifacts = db.execute("select artifact_uri from runs where run_uuid=?", (run_id,)).fetchone()[0]
    art_dir = Path(artifacts.replace("file://", ""))
    assert {"config.yaml", "ds_config.json", "manifest.json"} <= {p.name for p in art_dir.iterdir()}


def test_resume_after_sigkill_gives_the_same_losses(setup, baseline):
    out = setup["base"] / "run_killed"
    proc = launch(setup["cfg"], f"output_dir={out}", wait=False)
    marker = out / "checkpoints" / "step_000004" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), proc.stdout.read()[-3000:]
    assert not (out / "final_metrics.json").exists()  # it really died before the end
    resumed = launch(setup["cfg"], f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    a, b = losses(baseline), losses(out)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):  # bit-exact on CPU: same data order, same reductions, restored state
        assert b[step] == a[step], (step, a, b)
    info = json.loads((out / "run_info.json").read_text())
    db = sqlite3.connect(out / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 1 and info["run_id"]


def test_resume_on_other_world_size_is_refused(setup, baseline, tmp_path):
    proc = launch(
        setup["cfg"], f"output_dir={tmp_path}", f"resume={baseline / 'checkpoints' / 'step_000008'}", nprocs=1
    )
    assert proc.returncode != 0
    assert "was written by 2 ranks; this job has 1" in proc.stderr + proc.stdout


def test_two_nodes_on_loopback_agree_with_one_node(setup, baseline):
    out = setup["base"] / "run_2node"
    hostfile = setup["base"] / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [
        launch(
            setup["cfg"],
            f"output_dir={out}",
            wait=False,
            launcher=[
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(r),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
            ],
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    a, b = losses(baseline), losses(out)
    assert sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)


def test_nan_loss_stops_with_a_clear_message(setup, tmp_path):
    proc = launch(
        setup["cfg"],
        f"output_dir={tmp_path}",
        "optim.lr_base=1e30",
        "optim.lr_new=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        "save_every=0",
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "non-finite loss at step" in text and "samples [" in text, text[-3000:]


def test_mlflow_server_going_away_does_not_stop_training(setup, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not start")
        out = tmp_path / "run"
        proc = launch(
            setup["cfg"],
            f"output_dir={out}",
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
            "max_steps=20",
            "epochs=10",  # the held-out split varies with the tmp path; always have 20 steps
            "save_every=0",
            "eval_every=0",
            wait=False,
        )
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        text = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, text[-4000:]
        assert "MLflow unreachable" in text and "training goes on" in text, text[-4000:]
        assert sorted(losses(out)) == list(range(1, 21))  # nothing lost locally
        assert "MLflow lacks" in text and "./launch.sh replay" in text, text[-3000:]
        # Nothing lost for MLflow either: replay sends exactly what the run lacks (here straight
        # into the dead server's database, as a restarted server would receive it).
        run_id = json.loads((out / "run_info.json").read_text())["run_id"]
        db = sqlite3.connect(tmp_path / "server.db")
        query = "select step from metrics where run_uuid=? and key='loss'"
        delivered = {s for (s,) in db.execute(query, (run_id,))}
        assert delivered < set(range(1, 21)), "the server was killed mid-run, so some steps must be missing"
        sent = replay(str(out), f"sqlite:///{tmp_path / 'server.db'}")
        assert sent > 0 and {s for (s,) in db.execute(query, (run_id,))} == set(range(1, 21))
        assert replay(str(out), f"sqlite:///{tmp_path / 'server.db'}") == 0  # nothing twice
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_micro_decoder_from_the_base_top_is_identical_on_every_rank(setup, tmp_path):
    """micro_init=base_top under real ZeRO-3 partitioning (persistence threshold 0): with a zero
    learning rate the exported micro decoder equals the base's top layer, so every rank copied
    the gathered values (a rank copying a size-0 shard, or its own random init, would differ)."""
    from safetensors.torch import load_file

    from hamburger.model import load_model
    from trainer.export.export import export

    out = tmp_path / "run"
    proc = launch(
        setup["cfg"],
        f"output_dir={out}",
        "model.hamburger.micro_init=base_top",
        "optim.lr_base=0",
        "optim.lr_new=0",
        "optim.min_lr=0",
        "max_steps=1",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = load_model(export(str(out), str(tmp_path / "export"))["path"])
    base = load_file(str(setup["base"] / "model" / "model.safetensors"))
    top = max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    for name, value in model.micro.layers[0].state_dict().items():
        torch.testing.assert_close(value, base[f"model.layers.{top}.{name}"], atol=0, rtol=0)
    torch.testing.assert_close(model.micro.norm.weight, base["model.norm.weight"], atol=0, rtol=0)


def test_kl_to_the_frozen_base_trains(setup, tmp_path):
    """model.hamburger.kl_weight > 0 adds KL(frozen base || model): the batches must carry the
    plain token layout for the teacher (they did not, and every such run failed at step 1)."""
    proc = launch(
        setup["cfg"], f"output_dir={tmp_path}", "model.hamburger.kl_weight=0.5", "max_steps=2", "save_every=0"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kl = [r["metrics"]["kl"] for r in records if "kl" in r["metrics"]]
    assert kl and all(v >= 0 and v == v for v in kl)


def test_lr_base_zero_freezes_the_base_without_optimiser_state(setup, baseline, tmp_path):
    """optim.lr_base=0: the base's weights come out of training exactly as they went in, and the
    optimiser holds state for the grafted modules only (smaller rank files than the baseline's)."""
    from safetensors.torch import load_file

    from trainer.export.export import export

    out = tmp_path / "frozen"
    proc = launch(
        setup["cfg"], f"output_dir={out}", "model.base_training=frozen", "max_steps=2", "eval_every=0"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line)["metrics"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("lr_new" in m for m in logged) and not any("lr_base" in m for m in logged)
    exported = Path(export(str(out), str(tmp_path / "base_only"), base_only=True)["path"])
    before = load_file(str(setup["base"] / "model" / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name].to(tensor.dtype), tensor), name
    # an adapter folder of a frozen-base run: the grafted modules only, equal to the full export
    from hamburger.decode import generate
    from hamburger.model import load_model
    from trainer.export.export import ExportError

    adapter = load_model(export(str(out), str(tmp_path / "adapter"), adapter=True)["path"])
    full = load_model(export(str(out), str(tmp_path / "full"))["path"])
    for name, tensor in full.state_dict().items():
        assert torch.equal(adapter.state_dict()[name], tensor), name
    assert generate(adapter, [5, 17, 33, 8], 12, 0.5).tokens == generate(full, [5, 17, 33, 8], 12, 0.5).tokens
    with pytest.raises(ExportError, match=r"trained its whole base \(full\): export the full folder"):
        export(str(baseline), str(tmp_path / "no_adapter"), adapter=True)
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    frozen_size = (out / "checkpoints" / "step_000002" / optim).stat().st_size
    full_size = (baseline / "checkpoints" / "step_000008" / optim).stat().st_size
    assert frozen_size < 0.8 * full_size, (frozen_size, full_size)


def test_a_multi_turn_sharegpt_prep_trains_every_turn(setup, tmp_path):
    """A ShareGPT file of multi-turn conversations preps into one row per assistant turn and
    trains on them through the launcher like any other data."""
    from helpers import write_jsonl

    from data_prep.config import LabelConfig, PrepConfig, SourceConfig
    from data_prep.run import prepare

    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Count from {i}."},
                {"from": "gpt", "value": " ".join(str(j) for j in range(i, i + 5))},
                {"from": "human", "value": "Now backwards."},
                {"from": "gpt", "value": " ".join(str(j) for j in range(i + 4, i - 1, -1))},
            ]
        }
        for i in range(24)
    ]
    folder = prepare(
        PrepConfig(
            model=str(setup["base"] / "model"),
            sources=[
                SourceConfig(
                    path=str(write_jsonl(tmp_path / "chats.jsonl", rows)), messages_field="conversations"
                )
            ],
            output_root=str(tmp_path / "prep"),
            heldout_fraction=0.15,
            shard_rows=16,
            label=LabelConfig(strategy="fixed", fixed_k=3),
        )
    )
    assert json.loads((folder / "manifest.json").read_text())["turns_learned"] == 48
    out = tmp_path / "run"
    proc = launch(setup["cfg"], f"output_dir={out}", f"data.path={folder}", "max_steps=2", "eval_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2]
