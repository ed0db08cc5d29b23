"""Export: ZeRO-3 checkpoint -> HF folder -> MLflow registry -> a served endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from launcher import env, free_port
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hamburger.decode import generate
from hamburger.model import load_model
from hamburger.model.folder import WeightsError
from trainer.export.export import ExportError, export
from trainer.serve.loader import load

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def exported(baseline, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export")
    full = export(str(baseline), str(out / "full"), register="tiny-ham", max_shard_size="200KB")
    base = export(str(baseline), str(out / "base"), base_only=True)
    return {"full": Path(full["path"]), "base": Path(base["path"]), "result": full, "run": baseline}


def test_export_reproduces_the_engine_greedy_outputs(exported):
    folder = exported["full"]
    assert (folder / "model.safetensors.index.json").is_file()  # sharded above the size limit
    card = (folder / "README.md").read_text()
    assert (
        "Final metrics" in card and "compression" in card and "from trainer.serve.loader import load" in card
    )
    model = load_model(str(folder))
    probes = json.loads((exported["run"] / "samples.json").read_text())
    eos = model.base.config.eos_token_id
    for p in probes:
        res = generate(model, p["prompt_ids"], p["max_new_tokens"], p["confidence"], {eos})
        assert res.tokens == p["tokens"] and res.seg_lens == p["seg_lens"]


def test_base_only_export_loads_with_plain_transformers(exported):
    plain = AutoModelForCausalLM.from_pretrained(str(exported["base"])).eval()
    ham = load_model(str(exported["full"]))
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 198]])
    torch.testing.assert_close(plain(input_ids=ids).logits, ham.base(input_ids=ids).logits, atol=0, rtol=0)


def test_registry_round_trip(exported):
    uri = exported["result"]["uri"]
    assert uri == "models:/tiny-ham/1"
    import mlflow

    run_info = json.loads((exported["run"] / "run_info.json").read_text())
    mlflow.set_tracking_uri(run_info["tracking_uri"])
    version = mlflow.MlflowClient().get_model_version("tiny-ham", "1")
    assert version.tags["source_run_id"] == run_info["run_id"] and version.tags["checkpoint_step"] == "8"
    assert version.tags["data_manifest_hash"]
    gen = load(uri)
    local = load(str(exported["full"]))
    a, b = (
        gen.generate("Count from 3 to 8.", max_new_tokens=12),
        local.generate("Count from 3 to 8.", max_new_tokens=12),
    )
    assert a.text == b.text and a.tokens == b.tokens and a.macro_steps == b.macro_steps


def test_mlflow_models_serve_answers_rest(exported):
    run_info = json.loads((exported["run"] / "run_info.json").read_text())
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/tiny-ham/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**env(), "MLFLOW_TRACKING_URI": run_info["tracking_uri"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        body = json.dumps(
            {"dataframe_records": [{"prompt": "Count from 1 to 6.", "max_new_tokens": 8}]}
        ).encode()
        deadline, answer = time.time() + 240, None
        while time.time() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
                break
            except OSError:
                time.sleep(1)
        if answer is None:
            server.kill()
            pytest.fail("mlflow models serve gave no answer:\n" + server.communicate()[0][-3000:])
        row = answer["predictions"][0]
        assert isinstance(row["text"], str) and 1 <= row["tokens"] <= 8 and row["tokens_per_macro_step"] >= 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_tampered_export_is_refused_naming_the_tensor(exported, tmp_path):
    folder = tmp_path / "tampered"
    shutil.copytree(exported["full"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "micro.layers.0.mlp.up_proj.weight"
    file = folder / index["weight_map"][name]
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        load_model(str(folder))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(WeightsError, match=r"wrong shapes micro\.layers\.0\.mlp\.up_proj\.weight: \(3, 3\)"):
        load_model(str(folder))


def test_bad_checkpoints_and_outputs_are_refused(baseline, tmp_path):
    ckpt = baseline / "checkpoints" / "step_000008"
    with pytest.raises(ExportError, match="exists and is not empty"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("x")
        export(str(baseline), str(tmp_path / "busy"))
    broken = tmp_path / "run" / "checkpoints"
    shutil.copytree(baseline / "checkpoints", broken)
    (broken / "step_000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ExportError, match="missing rank file zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        export(str(broken / "step_000008"), str(tmp_path / "o1"))
    (broken / "step_000006" / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="incomplete checkpoint"):
        export(str(broken / "step_000006"), str(tmp_path / "o2"))
    (broken / "latest").unlink()
    shutil.copy(ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt", broken / "step_000008")
    with pytest.raises(ExportError, match="missing DeepSpeed's `latest` file"):
        export(str(broken / "step_000008"), str(tmp_path / "o3"))
    (broken / "latest").write_text("step_000008")
    data = bytearray((broken / "step_000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes())
    (broken / "step_000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
        bytes(data[: len(data) // 2])
    )
    with pytest.raises(ExportError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refused"):
        export(str(broken / "step_000008"), str(tmp_path / "o4"))
    with pytest.raises(ExportError, match="not a checkpoint of this trainer"):
        export(str(tmp_path), str(tmp_path / "o5"))
    assert not (tmp_path / "o4").exists()


def test_unreachable_registry_still_writes_the_folder(baseline, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ExportError, match=r"was written, but registering it as 'nope'"):
        export(
            str(baseline),
            str(tmp_path / "out"),
            register="nope",
            tracking_uri=f"http://127.0.0.1:{free_port()}",
        )
    model = load_model(str(tmp_path / "out"))  # complete: it reproduces the run
    probe = json.loads((baseline / "samples.json").read_text())[0]
    res = generate(
        model,
        probe["prompt_ids"],
        probe["max_new_tokens"],
        probe["confidence"],
        {model.base.config.eos_token_id},
    )
    assert res.tokens == probe["tokens"]
