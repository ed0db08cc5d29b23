"""`./launch.sh export RUN_OR_CHECKPOINT --out DIR [--base-only] [--register NAME] [--overwrite]`

ZeRO-3 checkpoint (any world size) -> consolidated fp32 -> a HAMburger model folder (or, with
--base-only, a standard Hugging Face causal-LM folder), optionally registered in the MLflow
Model Registry as a pyfunc that serves text. Runs in one process, no DeepSpeed zero_files.

Memory stays bounded: the rank partitions are memory-mapped and tensors are materialised one
output shard at a time, so the full fp32 model is never held several times over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from hamburger.io import DiskFullError, disk_full_named
from hamburger.model import folder
from hamburger.model.adapter import adapter_block, is_adapter_tensor
from hamburger.model.config import DEFAULT_CONFIDENCE, check_confidence
from hamburger.model.lora import merged_state
from trainer.export import zero_files
from trainer.train.checkpoint import (
    COMPLETE,
    CheckpointInfo,
    NotOurCheckpoint,
    is_step_folder,
    latest_checkpoint,
)
from trainer.train.data import manifest_summary

EXPORT_MARKER = ".hamburger-export.json"  # written into every export; --overwrite replaces only such folders


class ExportError(RuntimeError):
    pass


SHARD_SIZE = re.compile(r"\s*(\d+(\.\d+)?)\s*(TB|GB|MB|KB)\s*", re.IGNORECASE)


def check_shard_size(value: str | int) -> str | int:
    """--max-shard-size as safetensors sharding reads it (a number with TB, GB, MB or KB, or a
    byte count, returned as an int), checked before the consolidation spends minutes; a bad one
    is named."""
    text = str(value).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    found = SHARD_SIZE.fullmatch(text)
    if found is not None and float(found.group(1)) > 0:
        return text
    raise ExportError(
        f"--max-shard-size {value!r}: give a size above 0 such as 2GB, 500MB or 900KB (units TB, GB, MB, KB), "
        "or a byte count"
    )


def resolve_checkpoint(src: str | Path) -> Path:
    """A run folder (its newest complete checkpoint) or one checkpoint folder, verified."""
    p = Path(src)
    if not p.exists():
        raise ExportError(f"{p}: no such run or checkpoint folder")
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p / "checkpoints")
        if ckpt is None:
            raise ExportError(f"{p}: the run has no complete checkpoint")
    else:
        ckpt = p
    if not (ckpt / COMPLETE).is_file():
        if zero_files.has_rank_files(ckpt):
            raise ExportError(
                f"{ckpt}: incomplete checkpoint (no {COMPLETE} marker: the save was interrupted)"
            )
        raise ExportError(
            f"{ckpt}: not a checkpoint of this trainer (no {COMPLETE} marker, no DeepSpeed files)"
        )
    try:
        info = CheckpointInfo.read(ckpt)
        zero_files.verify_zero_files(ckpt, info.world_size)
    except (NotOurCheckpoint, zero_files.ZeroFileError) as e:
        raise ExportError(str(e)) from None
    return ckpt


def check_output_folder(out: Path, ckpt: Path, overwrite: bool) -> None:
    """--overwrite replaces a previous export (recognised by its marker file) and nothing else:
    never a folder holding other files, never the source run or a folder that contains it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a folder; give a folder path for the export")
    source = ckpt.resolve()
    target = out.resolve()
    if target == source or target in source.parents:
        raise ExportError(
            f"--out {out}: holds the source checkpoint {ckpt} (the source run or a folder containing it); "
            "export to another folder"
        )
    inside = next(
        (
            d
            for d in target.parents
            if d.name == "checkpoints" and d.is_dir() and any(map(is_step_folder, d.iterdir()))
        ),
        None,
    )
    if inside is not None:
        raise ExportError(
            f"--out {out}: lies inside a run's checkpoints folder ({inside}), which training owns; "
            "export to a folder outside it"
        )
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace a previous export")
    if not (out / EXPORT_MARKER).is_file():
        raise ExportError(
            f"--overwrite refused: {out} is not a previous export (no {EXPORT_MARKER} marker) and may hold "
            "other files; remove it yourself or choose another --out"
        )


def replace_folder(new: Path, out: Path, overwrite: bool = True) -> None:
    """Put the finished export in place; the previous one is moved aside first and removed last,
    so a kill at any moment leaves either the old or the new export at `out`. Without overwrite
    the rename itself is the check: it fails when another export put a folder at `out` since
    this one started (two exports to one --out never both report success)."""
    if not overwrite:
        try:
            new.rename(out)  # atomic; refused by the kernel when `out` is a non-empty folder
            return
        except OSError:
            if not out.exists():
                raise
        raise ExportError(
            f"{out} was written by another export while this one ran; pass --overwrite to replace it"
        )
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.tmp-{os.getpid()}-old")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(out: Path) -> None:
    """Delete `<out>.tmp-<pid>-*` folders left by an export that was killed (its pid is gone)."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        pid = tmp.name[len(out.name) + len(".tmp-") :].split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"[export] removed {tmp}, left by an interrupted export", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def consolidated(ckpt: Path) -> dict:
    """Lazy fp32 tensors of the model (materialised on .contiguous()), the frozen teacher left out."""
    try:
        state = zero_files.consolidated_zero_state(ckpt)
    except zero_files.ZeroFileError as e:
        raise ExportError(str(e)) from None
    return {k: v for k, v in state.items() if not k.startswith("teacher.")}


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def export(
    src: str,
    out: str,
    base_only: bool = False,
    overwrite: bool = False,
    register: str = "",
    tracking_uri: str = "",
    max_shard_size: str = "2GB",
    confidence: float = DEFAULT_CONFIDENCE,
    adapter: bool = False,
) -> dict:
    try:
        check_confidence(confidence, "export --confidence")
    except ValueError as e:
        raise ExportError(str(e)) from None
    max_shard_size = check_shard_size(max_shard_size)
    ckpt = resolve_checkpoint(src)
    info = CheckpointInfo.read(ckpt)
    out_path = Path(out)
    check_output_folder(out_path, ckpt, overwrite)
    remove_stale_temporaries(out_path)
    meta = {
        "model_type": folder.MODEL_TYPE,
        "base_architecture": info.base_architecture,
        "base_config": info.base_config,
        "hamburger": info.hamburger,
    }
    if base_only and adapter:
        raise ExportError(
            "--base-only and --adapter exclude each other: one writes only the base, the other all but it"
        )
    try:
        block = adapter_block(info.base, info.base_path, info.base_training, info.lora) if adapter else None
    except ValueError as e:
        raise ExportError(f"{ckpt}: {e}") from None
    expected, tied = folder.expected_shapes(meta)
    raw = consolidated(ckpt)
    state = merged_state(raw, info.lora)  # LoRA folded into the base's weights
    if tied:
        state.pop(folder.TIED_KEY, None)
    folder.check_shapes(expected, {k: _shape(v) for k, v in state.items()}, f"checkpoint {ckpt}")
    if adapter:  # the grafted modules and the LoRA pairs, unmerged; the base stays where it is
        state = {k: v for k, v in raw.items() if is_adapter_tensor(k)}
        expected = {k: _shape(v) for k, v in state.items()}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_path.name}.tmp-{os.getpid()}-", dir=out_path.parent))
    try:
        with disk_full_named(out_path.parent, f"the export {out_path}"):

            def get(name: str) -> torch.Tensor:
                key = name if not base_only else "base." + name
                return state[key].contiguous()

            if base_only:
                names = {
                    k[len("base.") :]: (expected[k], torch.float32) for k in expected if k.startswith("base.")
                }
                folder.save_weights(tmp, names, get, max_shard_size)
                folder.base_config_from_meta(meta).save_pretrained(tmp)
            else:
                folder.save_weights(
                    tmp, {k: (s, torch.float32) for k, s in expected.items()}, get, max_shard_size
                )
                folder.write_meta(
                    tmp,
                    meta["base_architecture"],
                    meta["base_config"],
                    meta["hamburger"],
                    lineage={
                        "base": info.base,
                        "source_run_id": info.run_id,
                        "checkpoint_step": info.step,
                        "data": info.data,
                    },
                    adapter=block,
                )
            _copy_tokenizer(info.base_path, tmp)
            eos = info.base_config.get("eos_token_id")
            gen = {"eos_token_id": eos, "max_new_tokens": 256}
            if not base_only:
                gen["confidence"] = confidence
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
            (tmp / "README.md").write_text(model_card(ckpt, info, base_only, confidence, adapter))
            (tmp / EXPORT_MARKER).write_text(
                json.dumps(
                    {"checkpoint": str(ckpt), "step": info.step, "base_only": base_only, "adapter": adapter},
                    indent=1,
                )
            )
            replace_folder(tmp, out_path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {
        "path": str(out_path),
        "checkpoint": str(ckpt),
        "step": info.step,
        "run_id": info.run_id,
    }
    print(f"[export] wrote {out_path} from {ckpt} (step {info.step})", flush=True)
    if register:
        result.update(register_model(out_path, register, info, ckpt, tracking_uri))
    return result


def _copy_tokenizer(base_path: str, dest: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_path).save_pretrained(dest)


def model_card(
    ckpt: Path, info: CheckpointInfo, base_only: bool, confidence: float, adapter: bool = False
) -> str:
    run_dir = ckpt.parent.parent
    metrics = {}
    if (run_dir / "final_metrics.json").is_file():
        metrics = json.loads((run_dir / "final_metrics.json").read_text())
    data = Path(info.data)
    manifest = manifest_summary(data) if (data / "manifest.json").is_file() else {}
    lines = [
        f"# {'Base model' if base_only else 'HAMburger model'} fine-tuned from `{info.base}`",
        "",
        f"Exported from `{ckpt}` (step {info.step}, {info.world_size} ranks, MLflow run `{info.run_id}`).",
        "",
        *(
            [
                f"An adapter folder (base trained: {info.base_training}): the grafted modules"
                + (" and LoRA pairs" if info.lora else "")
                + f" only. Loading reads the base `{info.base}` and checks its weights' hash.",
                "",
            ]
            if adapter
            else []
        ),
        "## Load",
        "",
        "```python",
    ]
    if base_only:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        ]
    else:
        lines += [
            "from trainer.serve.loader import load",
            "gen = load(PATH)",
            f"print(gen.generate('Hello!', confidence={confidence}).text)",
        ]
    lines += [
        "```",
        "",
        "## HAMburger settings",
        "",
        "```json",
        json.dumps(info.hamburger, indent=1),
        "```",
        "",
    ]
    if manifest:
        lines += [
            "## Training data (prep manifest)",
            "",
            "```json",
            json.dumps(manifest, indent=1),
            "```",
            "",
        ]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def register_model(path: Path, name: str, info: CheckpointInfo, ckpt: Path, tracking_uri: str = "") -> dict:
    """Log the folder to the training run as a pyfunc and register it; lineage goes in tags.

    The pyfunc is logged as MLflow "models from code" (trainer/export/pyfunc_model.py) with a signature."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # not MLflow's minutes of back-off
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    from trainer.export.pyfunc import pyfunc_spec

    run_info_file = ckpt.parent.parent / "run_info.json"
    uri = tracking_uri or (
        json.loads(run_info_file.read_text())["tracking_uri"] if run_info_file.is_file() else ""
    )
    try:
        if uri:
            mlflow.set_tracking_uri(uri)
        tags = {
            "source_run_id": str(info.run_id),
            "checkpoint_step": str(info.step),
            "checkpoint": str(ckpt),
            "data_manifest_hash": info.data_key_hash,
        }
        run_id = info.run_id
        if not run_id:  # a run without tracking: a new run, its artifacts beside a local store
            from trainer.train.tracking import experiment_id

            mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(), "hamburger", uri))
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run():
            model_info = mlflow.pyfunc.log_model(
                name="hamburger_model",
                **pyfunc_spec(
                    path
                ),  # models from code: loading runs trainer/export/pyfunc_model.py, no pickle
                registered_model_name=name,
                pip_requirements=_pip_requirements(),
            )
        client = mlflow.MlflowClient()
        version = model_info.registered_model_version
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"the folder {path} was written, but registering it as {name!r} in MLflow ({uri or 'default'}) "
            f"failed: {type(e).__name__}: {e}"
        ) from None
    print(f"[export] registered models:/{name}/{version}", flush=True)
    return {"registered_name": name, "version": int(version), "uri": f"models:/{name}/{version}"}


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "mlflow", "pandas")] + [
        "hamburger-trainer"
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a run's output_dir (its newest checkpoint) or a checkpoint folder")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--base-only", action="store_true", help="a plain HF causal-LM folder of the fine-tuned base"
    )
    ap.add_argument(
        "--adapter",
        action="store_true",
        help="an adapter folder: the grafted modules (and LoRA pairs) of a frozen- or LoRA-base run, put "
        "onto the unchanged base when loaded",
    )
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--register", default="", help="register in the MLflow Model Registry under this name")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help="default confidence in generation_config.json",
    )
    args = ap.parse_args(argv)
    try:
        result = export(
            args.source,
            args.out,
            args.base_only,
            args.overwrite,
            args.register,
            args.tracking_uri,
            args.max_shard_size,
            args.confidence,
            args.adapter,
        )
    except (ExportError, folder.WeightsError, FileNotFoundError, DiskFullError) as e:
        print(f"[export] error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
