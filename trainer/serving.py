"""Loading an exported model to generate text: the one-line loader and the MLflow pyfunc.

from trainer.serving import load
gen = load("exports/my-model")          # or an MLflow URI: "models:/NAME/VERSION"
gen.generate("Write a haiku about bread.")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import HAMburgerModel, generate

DEFAULT_CONFIDENCE = 0.9


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
        self.model = HAMburgerModel.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        gen_cfg = self.path / "generation_config.json"
        self.defaults = json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else {}
        eos = self.defaults.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def encode(self, prompt: str | list[dict]) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(out["input_ids"])
        return self.tokenizer(messages[-1]["content"])["input_ids"]

    def generate(
        self, prompt: str | list[dict], max_new_tokens: int | None = None, confidence: float | None = None
    ) -> Generation:
        max_new = max_new_tokens or self.defaults.get("max_new_tokens", 256)
        conf = confidence if confidence is not None else self.defaults.get("confidence", DEFAULT_CONFIDENCE)
        res = generate(self.model, self.encode(prompt), max_new, conf, self.eos)
        text = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
        return Generation(text=text, tokens=len(res.tokens), macro_steps=res.base_forwards)


def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("models:/", "runs:/"))


def resolve_folder(spec: str | Path) -> Path:
    """The model folder behind an export folder or an MLflow URI (models:/NAME/VERSION, runs:/...).

    Inside a downloaded MLflow model the HAMburger folder wins; a plain HF folder (a config.json
    with a model_type) is taken otherwise."""
    spec = str(spec)
    if not is_uri(spec):
        return Path(spec)
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


try:
    import mlflow.pyfunc

    class HAMburgerPyfunc(mlflow.pyfunc.PythonModel):
        """Text in, text out plus tokens-per-step stats. Input: a DataFrame with a `prompt`
        column (optional `max_new_tokens`, `confidence` columns), or a list of strings."""

        def load_context(self, context) -> None:
            self.generator = HAMburgerGenerator(context.artifacts["model"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            params = params or {}
            if isinstance(model_input, pd.DataFrame):
                rows = model_input.to_dict("records")
            else:
                rows = [
                    {"prompt": p} for p in (model_input if isinstance(model_input, list) else [model_input])
                ]
            out = []
            for row in rows:
                g = self.generator.generate(
                    str(row["prompt"]),
                    max_new_tokens=int(row.get("max_new_tokens") or params.get("max_new_tokens") or 128),
                    confidence=row.get("confidence") or params.get("confidence"),
                )
                out.append(
                    {
                        "text": g.text,
                        "tokens": g.tokens,
                        "macro_steps": g.macro_steps,
                        "tokens_per_step": g.tokens_per_step,
                    }
                )
            return pd.DataFrame(out)
except ImportError:  # mlflow is a dependency; this keeps the loader usable without it
    HAMburgerPyfunc = None  # type: ignore[assignment,misc]
