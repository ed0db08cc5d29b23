"""Checks made before any model is built: does this data fit this model, and does this run
folder's checkpoint belong to this job?

Both exist because the failures they prevent are silent or late: shards made with another
tokenizer train on wrong token ids (same vocabulary size) or crash deep inside an embedding
lookup; data labelled with segments longer than the model's K fails at step 1 naming sample 0;
and a finished run folder pointed at other data resumes at its last step, trains nothing and
rewrites its record of the data, so an export's model card names data the model never saw.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.fingerprint import vocab_fingerprint
from data_prep.shards import load_manifest
from hamburger.assets import resolve_model
from hamburger.model import HAMburgerConfig
from hamburger.model.lora import adapter_shape
from trainer.train.checkpoint import CheckpointInfo

ARCHITECTURE_KEYS = ("max_segment_len", "micro_layers", "feature_layers", "num_features", "embedder_head_dim")


class RunMismatch(ValueError):
    """The data, model or run folder do not go together; the message says what differs."""


def check_data_fits_model(data_dir: Path, base: str, hcfg: HAMburgerConfig, top: int) -> list[str]:
    """Refuse data the model cannot train on (top: the largest token id in the shards); return
    warnings for what is merely unusual."""
    from transformers import AutoConfig

    manifest = load_manifest(data_dir)
    key = manifest["key"]
    base_path = resolve_model(base)
    problems, warnings = [], []

    data_k = key["label"]["max_segment_len"]
    if data_k > hcfg.max_segment_len:
        problems.append(
            f"segments were labelled with K={data_k} (label.max_segment_len) but the model has "
            f"model.hamburger.max_segment_len={hcfg.max_segment_len}; relabel with K<={hcfg.max_segment_len} or raise the model's K"
        )
    vocab = AutoConfig.from_pretrained(base_path).vocab_size
    if top >= vocab:
        problems.append(f"token id {top} in the shards is outside the model's vocabulary of {vocab} ids")

    tok_problem, tok_warning = _compare_tokenizers(manifest, base_path)
    problems += tok_problem
    warnings += tok_warning
    if problems:
        raise RunMismatch(f"data {data_dir} does not fit model {base}:\n  - " + "\n  - ".join(problems))
    return warnings


def _compare_tokenizers(manifest: dict, base_path: str) -> tuple[list[str], list[str]]:
    """Same vocabulary, same special tokens; the chat template only warns (a data set may use
    'plain' or its own template on purpose, but serving will use the tokenizer's)."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(base_path)
    key = manifest["key"]
    template = key.get("chat_template") or ""
    warnings = []
    if base_tok.chat_template and template and template != base_tok.chat_template:
        warnings.append(
            "the data was tokenised with a chat template other than the base tokenizer's; "
            "generation will use the tokenizer's own template"
        )
    recorded = manifest.get("tokenizer_check")
    if recorded:  # the manifest records the vocabulary's hash: no need to load the data's tokenizer
        mine = vocab_fingerprint(base_tok)
        if recorded["vocab_sha256"] != mine["vocab_sha256"]:
            return [
                f"the data was tokenised with {key.get('tokenizer')!r}, whose vocabulary differs from the "
                f"model's ({recorded['vocab_size']} vs {mine['vocab_size']} entries, different token ids); "
                "prepare the data with the model's tokenizer"
            ], warnings
        if recorded["eos_token_id"] != mine["eos_token_id"]:
            return [
                f"the data's tokenizer ends turns with id {recorded['eos_token_id']}, "
                f"the model's with {mine['eos_token_id']}"
            ], warnings
        return [], warnings
    data_tok_name = key.get("tokenizer") or key.get("model") or ""
    try:
        data_tok_path = resolve_model(data_tok_name)
    except Exception:  # noqa: BLE001 - a builtin that is not installed here
        data_tok_path = data_tok_name
    if Path(str(data_tok_path)).resolve() == Path(base_path).resolve() or data_tok_path == base_path:
        return [], warnings
    try:
        data_tok = AutoTokenizer.from_pretrained(str(data_tok_path))
    except Exception as e:  # noqa: BLE001 - not reachable from here (another machine's path, no hub)
        warnings.append(
            f"cannot load the data's tokenizer {data_tok_name!r} to compare it with the model's "
            f"({type(e).__name__}); only the token-id range was checked"
        )
        return [], warnings
    if data_tok.get_vocab() != base_tok.get_vocab():
        a, b = data_tok.get_vocab(), base_tok.get_vocab()
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        return [
            f"the data was tokenised with {data_tok_name!r}, whose vocabulary differs from the model's "
            f"({len(a)} vs {len(b)} entries; e.g. {differ}); prepare the data with the model's tokenizer"
        ], warnings
    if data_tok.eos_token != base_tok.eos_token:
        return [
            f"the data's tokenizer ends turns with {data_tok.eos_token!r}, the model's with {base_tok.eos_token!r}"
        ], warnings
    return [], warnings


def check_resume_matches(info: CheckpointInfo, ckpt: Path, cfg, data_hash: str) -> None:
    """A checkpoint resumes only the job that wrote it: same base model, same HAMburger
    settings, same way of training the base (LoRA's shapes included), same data (by the prep
    manifest's key hash, so a moved prep folder still matches). `cfg` is the job's TrainConfig."""
    differ = []
    mcfg = cfg.model
    base, hcfg = mcfg.base, mcfg.hamburger
    mine = cfg.base_training
    if info.base_training != mine:
        differ.append(f"model.base_training: checkpoint {info.base_training!r}, this job {mine!r}")
    elif mine == "lora":
        saved, this = adapter_shape(info.lora), adapter_shape(mcfg.lora.to_dict())
        differ += [
            f"model.lora.{k}: checkpoint {saved[k]!r}, this job {v!r}"
            for k, v in this.items()
            if saved[k] != v
        ]
    if info.base != base:
        differ.append(f"model.base: checkpoint {info.base!r}, this job {base!r}")
    saved = info.hamburger
    for k, v in hcfg.to_dict().items():  # the modules' shapes; loss weights may change on resume
        if k in ARCHITECTURE_KEYS and k in saved and saved[k] != v:
            differ.append(f"model.hamburger.{k}: checkpoint {saved[k]!r}, this job {v!r}")
    saved_hash = info.data_key_hash
    if saved_hash and saved_hash != data_hash:
        differ.append(
            f"data: checkpoint trained on prep {saved_hash[:12]} ({info.data}), this job's is {data_hash[:12]}"
        )
    if differ:
        raise RunMismatch(
            f"{ckpt} belongs to another job, so it cannot be resumed:\n  - "
            + "\n  - ".join(differ)
            + "\nUse another output_dir for a new run, or resume=none to start afresh here (the old "
            "checkpoints are moved aside, not deleted)."
        )
