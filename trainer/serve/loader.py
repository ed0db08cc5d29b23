"""Loading an exported model to generate text: the one-line loader, the serving engine and the
MLflow pyfunc.

from trainer.serve.loader import load
gen = load("exports/my-model")          # or an MLflow URI: "models:/NAME/VERSION"
gen.generate("Write a haiku about bread.")

`load_for_serving` loads a HAMburger folder or a plain HF folder (the base) for continuous batching
(hamburger/decode/continuous.py); the OpenAI server (trainer/serve/app.py) and the pyfunc both use it. The
pyfunc is logged as MLflow "models from code" (trainer/export/pyfunc_model.py): loading a registered
model runs this project's code, never an unpickled object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hamburger.decode import DecodeResult
from hamburger.decode.batched import generate_batch
from hamburger.decode.continuous import BaseStepper, ContinuousBatch, HAMburgerStepper
from hamburger.model import load_model
from hamburger.model.config import DEFAULT_CONFIDENCE, check_confidence
from hamburger.model.folder_check import check_model_folder, read_json_object


class HAMburgerGenerator:
    """`load()`'s generator. decode: auto (default: CUDA graphs on a GPU, static shapes on CPU),
    graphed, static or eager (the reference loop); all give the same greedy tokens."""

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        decode: str = "auto",
    ):
        from transformers import AutoTokenizer

        from hamburger.decode.batched import DECODE_MODES

        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.decode = decode
        self.path = Path(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.defaults = generation_defaults(self.path)  # a bad stored default is named before any load
        self.model = load_model(str(path), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        eos = self.defaults.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(
        self, prompt: str | list[dict], max_new_tokens: int | None = None, confidence: float | None = None
    ) -> DecodeResult:
        max_new = max_new_tokens or self.defaults.get("max_new_tokens", 256)
        conf = confidence if confidence is not None else self.defaults.get("confidence", DEFAULT_CONFIDENCE)
        res = generate_batch(self.model, [self.encode(prompt)], max_new, conf, self.eos, decode=self.decode)[
            0
        ]
        res.text = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
        return res


def generation_defaults(folder: Path) -> dict:
    """The folder's generation_config.json (or {}), checked where it is read: a confidence
    outside (0, 1] or a max_new_tokens below 1 is refused naming the file."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    defaults = read_json_object(path)
    if "confidence" in defaults:
        check_confidence(defaults["confidence"], str(path))
    n = defaults.get("max_new_tokens", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{path}: max_new_tokens must be an integer >= 1, got {n!r}")
    return defaults


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
        if not local.is_dir():
            raise FileNotFoundError(f"{spec}: no such model folder (nor an MLflow model URI)")
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
    cfg = check_model_folder(path)
    if cfg.get("model_type") != "hamburger":
        raise ValueError(
            f"{path}/config.json: model_type {cfg.get('model_type')!r} is not a HAMburger model; serve a "
            "plain model with `./launch.sh serve`, or load it with transformers"
        )
    return HAMburgerGenerator(path, **kw)


@dataclass
class LoadedModel:
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
    _slot_batches: dict = field(default_factory=dict, repr=False)

    def serving_mode(self, decode: str) -> str:
        """What `serve --decode` runs here: auto is the graphed slot batch on a GPU and the eager
        batch on CPU, where a step over every slot costs compute in proportion."""
        from hamburger.decode.batched import resolve_mode

        return resolve_mode(decode, self.stepper.parameters_of, cpu="eager")

    def batch(
        self,
        decode: str = "eager",
        slots: int = 16,
        max_prompt: int = 1024,
        max_new: int = 1024,
        batch_aware: bool = False,
        max_segment_len: int = 0,
    ):
        """The running batch continuous batching decodes in: eager (ContinuousBatch: dynamic
        caches) or, for static / graphed, a SlotBatch (hamburger/decode/slots.py: fixed slots,
        static shapes, CUDA graphs on a GPU) of `slots` rows holding prompts of up to max_prompt
        tokens and up to max_new new tokens, built once per shape; auto: see serving_mode.
        max_segment_len caps HAMburger's segments (0: the model's K)."""
        from hamburger.decode.slots import SlotBatch

        model = self.stepper.parameters_of
        mode = self.serving_mode(decode)
        if mode == "eager":
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else 0
            return ContinuousBatch(self.stepper, self.eos, pad, self.device, batch_aware, max_segment_len)
        key = (mode, slots, max_prompt, max_new, batch_aware, max_segment_len)
        if key not in self._slot_batches:
            self._slot_batches.clear()  # one shape at a time: each holds its KV caches
            self._slot_batches[key] = SlotBatch(
                model,
                slots,
                max_prompt,
                max_new,
                self.eos,
                mode == "graphed",
                batch_aware,
                max_segment_len or None,
            )
        return self._slot_batches[key]


def load_for_serving(spec: str, dtype: str = "float32", device: str = "", name: str = "") -> LoadedModel:
    """A HAMburger folder, a plain HF causal-LM folder, or an MLflow model URI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_folder(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    cfg = check_model_folder(path)
    defaults = generation_defaults(path)
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
    return LoadedModel(
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
