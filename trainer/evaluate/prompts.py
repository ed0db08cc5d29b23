"""What the eval stage decodes: the model folder it evaluates and the prompts it feeds both models.

A model spec (export folder, models:/ URI or training run) is resolved to an export folder, and
prompts come from a .jsonl prompt file (every malformed line named) or a prep folder's split
(with the reference response and its segment lengths, for the held-out cross-entropy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.evaluate.config import EvalConfig


@dataclass
class Prompt:
    ids: list[int]
    meta: dict
    reference: list[int] | None = None
    seg_lens: list[int] | None = None
    where: str = ""
    """Where it came from, for messages: `FILE line N` or `FOLDER split S row N`."""


# ---------------------------------------------------------------- inputs
def resolve_model_folder(spec: str, output_dir: Path) -> Path:
    p = Path(spec)
    if spec.startswith("models:/") or spec.startswith("runs:/"):
        from trainer.serve.loader import resolve_folder

        return resolve_folder(spec)  # the downloaded model folder; evaluate loads it once
    if (p / "config.json").is_file():
        return p
    from trainer.export.export import export

    out = output_dir / "model"
    return Path(export(spec, str(out), overwrite=True)["path"])


def load_prompts(cfg: EvalConfig, tokenizer, default_data: str) -> list[Prompt]:
    data = cfg.data or default_data
    if not data:
        raise ValueError("data: no prompt file or prep folder given, and the model records none")
    if Path(data).is_file() and not data.endswith(".jsonl"):
        raise ValueError(
            f"data={data}: a file that is not .jsonl; eval reads a .jsonl prompt file (one JSON object "
            "with a 'prompt' per line) or a prep folder (its manifest.json and shards)"
        )
    if data.endswith(".jsonl"):
        out = []
        for line, rec in read_prompt_records(Path(data)):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
            out.append(Prompt(list(ids["input_ids"]), rec, where=f"{data} line {line}"))
        return out[: cfg.max_prompts]
    from data_prep.shards import read_split

    rows = read_split(data, cfg.split).to_pylist()[: cfg.max_prompts]
    return [
        Prompt(
            r["input_ids"][: r["prompt_len"]],
            json.loads(r["meta"] or "{}"),
            r["input_ids"][r["prompt_len"] :],
            r["seg_lens"],
            where=f"{data} split {cfg.split} row {i}",
        )
        for i, r in enumerate(rows)
    ]


def check_lengths(prompts: list[Prompt], max_new_tokens: int, context: int) -> None:
    """Every prompt + max_new_tokens fits the model's context, or the first that does not is
    named with the limit (decoding past the position table fails deep inside, or allocates for
    a prompt no model can read)."""
    if max_new_tokens >= context:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) does not fit the model's context of {context} positions"
        )
    for p in prompts:
        if len(p.ids) + max_new_tokens > context:
            raise ValueError(
                f"{p.where}: prompt of {len(p.ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's context of {context} positions; shorten the prompt or lower max_new_tokens"
            )


def read_prompt_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a .jsonl prompt file; every malformed line is named."""
    if not path.is_file():
        raise ValueError(f"data={path}: no such prompt file")
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{path}: line {n}: field 'prompt' must be a non-empty string")
            for field_name in ("answer", "test", "entry_point"):
                if rec.get(field_name) is not None and not isinstance(rec[field_name], str):
                    raise ValueError(f"{path}: line {n}: field {field_name!r} must be a string")
            records.append((n, rec))
    if not records:
        raise ValueError(f"{path}: no prompts (the file has no records)")
    return records
