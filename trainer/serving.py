"""Loading an exported model to generate text: the one-line loader, the serving engine and the
MLflow pyfunc.

from trainer.serving import load
gen = load("exports/my-model")          # or an MLflow URI: "models:/NAME/VERSION"
gen.generate("Write a haiku about bread.")

`load_engine` loads a HAMburger folder or a plain HF folder (the base) for continuous batching
(trainer/batcher.py); the OpenAI server (trainer/server.py) and the pyfunc both use it. The
pyfunc is logged as MLflow "models from code" (trainer/pyfunc_model.py): loading a registered
model runs this project's code, never an unpickled object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hamburger.model import generate, load_model

from .batcher import BaseStepper, ContinuousBatch, HAMburgerStepper

DEFAULT_CONFIDENCE = 0.9
MAX_NEW_TOKENS_CAP = 1024
"""The pyfunc's cap on max_new_tokens (a request over it is refused, never run)."""
PYFUNC_MAX_BATCH = 16
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


@dataclass
class Generation:
    text: str
    tokens: int
    macro_steps: int

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens / base forward passes (the prefill counted as one)."""
        return self.tokens / max(self.macro_steps, 1)


class HAMburgerGenerator:
    def __init__(self, path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(str(path), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        gen_cfg = self.path / "generation_config.json"
        self.defaults = json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else {}
        eos = self.defaults.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(
        self, prompt: str | list[dict], max_new_tokens: int | None = None, confidence: float | None = None
    ) -> Generation:
        max_new = max_new_tokens or self.defaults.get("max_new_tokens", 256)
        conf = confidence if confidence is not None else self.defaults.get("confidence", DEFAULT_CONFIDENCE)
        res = generate(self.model, self.encode(prompt), max_new, conf, self.eos)
        text = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
        return Generation(text=text, tokens=len(res.tokens), macro_steps=res.base_forwards)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A string is one user turn through the chat template (when the tokenizer has one)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    return tokenizer(messages[-1]["content"])["input_ids"]


def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("models:/", "runs:/"))


def resolve_folder(spec: str | Path) -> Path:
    """The model folder behind an export folder, an MLflow URI (models:/NAME/VERSION, runs:/...)
    or a local MLflow model folder (one with an MLmodel file).

    Inside a downloaded MLflow model the HAMburger folder wins; a plain HF folder (a config.json
    with a model_type) is taken otherwise."""
    spec = str(spec)
    local = Path(spec)
    if not is_uri(spec):
        if (local / "config.json").is_file() or not (local / "MLmodel").is_file():
            return local
    else:  # an MLflow model: its artifacts hold the model folder
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(spec))
    configs = sorted(local.rglob("config.json"))
    hamburger = [p for p in configs if '"hamburger"' in p.read_text()[:200]]
    plain = [p for p in configs if "model_type" in p.read_text()]
    if not hamburger and not plain:
        raise FileNotFoundError(f"{spec}: no model folder inside the downloaded artifacts ({local})")
    return (hamburger or plain)[0].parent


def load(path_or_uri: str, **kw) -> HAMburgerGenerator:
    """A generator from an export folder, or from an MLflow model URI (models:/NAME/VERSION)."""
    path = resolve_folder(path_or_uri)
    if not (path / "config.json").is_file() or '"hamburger"' not in (path / "config.json").read_text()[:200]:
        raise FileNotFoundError(f"{path_or_uri}: no HAMburger model folder inside")
    return HAMburgerGenerator(path, **kw)


@dataclass
class Engine:
    """A loaded model (HAMburger or plain base) with what serving needs to know about it."""

    stepper: object
    tokenizer: object
    eos: set[int]
    name: str
    kind: str
    max_positions: int
    default_max_tokens: int
    default_confidence: float | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def batch(self) -> ContinuousBatch:
        pad = self.tokenizer.pad_token_id
        return ContinuousBatch(self.stepper, self.eos, pad if pad is not None else 0, self.device)


def load_engine(spec: str, dtype: str = "float32", device: str = "", name: str = "") -> Engine:
    """A HAMburger folder, a plain HF causal-LM folder, or an MLflow model URI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_folder(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    cfg = json.loads((path / "config.json").read_text())
    gen_file = path / "generation_config.json"
    defaults = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if cfg.get("model_type") == "hamburger":
        model = load_model(str(path), dtype=dt).to(dev).eval()
        stepper, kind, base_cfg = HAMburgerStepper(model), "hamburger", model.base.config
        confidence = defaults.get("confidence", DEFAULT_CONFIDENCE)
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(dev).eval()
        stepper, kind, base_cfg, confidence = BaseStepper(lm), "base", lm.config, None
    eos = defaults.get("eos_token_id", tokenizer.eos_token_id)
    eos_set = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    return Engine(
        stepper=stepper,
        tokenizer=tokenizer,
        eos=eos_set,
        name=name or path.name,
        kind=kind,
        max_positions=int(getattr(base_cfg, "max_position_embeddings", 1 << 30)),
        default_max_tokens=int(defaults.get("max_new_tokens", 256)),
        default_confidence=confidence,
        device=dev,
    )


def pyfunc_signature():
    """Input: `prompt` (string), optional `max_new_tokens` and `confidence`. max_new_tokens is
    declared double on purpose: a row that omits it arrives as NaN (and gets the default) and 2.5
    arrives as 2.5 (and is refused); a long column would fail the whole request on the first and
    silently truncate the second. Request-level params (same names) fill rows that omit them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("double", "max_new_tokens", required=False),
            ColSpec("double", "confidence", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "text"),
            ColSpec("long", "tokens"),
            ColSpec("long", "macro_steps"),
            ColSpec("double", "tokens_per_step"),
        ]
    )
    params = ParamSchema([ParamSpec("max_new_tokens", "long", None), ParamSpec("confidence", "double", None)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pyfunc_spec(folder: str | Path) -> dict:
    """Keyword arguments of mlflow.pyfunc.log_model / save_model for a model folder: models from
    code (the file trainer/pyfunc_model.py, no pickle), the folder as an artifact, the signature."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {"model": str(folder)},
        "signature": pyfunc_signature(),
    }


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # a 400 under `mlflow models serve`


def check_max_new_tokens(v, where: str) -> int:
    ok = (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()
    )
    if not ok or not 1 <= v <= MAX_NEW_TOKENS_CAP:
        raise _bad_input(
            f"{where}: max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_CAP}], got {v!r}"
        )
    return int(v)


def check_confidence(v, where: str) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not 0 < v <= 1:
        raise _bad_input(f"{where}: confidence must be a number in (0, 1], got {v!r}")
    return float(v)


def pyfunc_rows(model_input) -> list[dict]:
    """Rows as dicts from a DataFrame, a list of strings or dicts, or one string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise _bad_input(f"the input has no `prompt` column (columns: {list(model_input.columns)})")
        return model_input.to_dict("records")
    items = model_input if isinstance(model_input, list) else [model_input]
    return [item if isinstance(item, dict) else {"prompt": item} for item in items]
