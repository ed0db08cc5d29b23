"""The MLflow pyfunc of a HAMburger export, and its "models from code" entry.

MLflow runs this file when it loads a registered model (instead of unpickling an object): it
builds the pyfunc from this project's code, which must be importable (the project installed).
Logged by trainer/export/export.py (register_model) through trainer.export.pyfunc.pyfunc_spec. MLflow is
imported here only, so the rest of serving (and the server) works where MLflow is absent.
"""

import mlflow
import mlflow.pyfunc

from hamburger.decode.continuous import Sequence, decode_all
from trainer.export.pyfunc import (
    MAX_NEW_TOKENS_CAP,
    PYFUNC_MAX_BATCH,
    _bad_input,
    _missing,
    check_confidence,
    check_max_new_tokens,
    pyfunc_rows,
)
from trainer.serve.loader import encode_prompt, load_for_serving


class HAMburgerPyfunc(mlflow.pyfunc.PythonModel):
    """Text in, text out plus tokens-per-step stats. Input (the signature's named columns, from
    Python's predict and over REST alike): a DataFrame with a `prompt` column (optional
    `max_new_tokens`, `confidence` columns, integers or numbers), a dict of such columns
    ({"prompt": ["Hi", "Hello"]}) or a list of row dicts ([{"prompt": "Hi"}]). A bare list of
    strings has no column names, and MLflow's schema check refuses it before this code runs.
    Request-level `params` (max_new_tokens, confidence) fill rows that omit a field. All
    rows are validated first (a bad one fails the request with a 400 naming row and field),
    then decoded together by continuous batching, each row with its own settings."""

    def load_context(self, context) -> None:
        self.loaded = load_for_serving(context.artifacts["model"])

    def _sequence(self, i: int, row: dict, params: dict) -> Sequence:
        prompt = row.get("prompt")
        if _missing(prompt) or not isinstance(prompt, str) or not prompt:
            raise _bad_input(f"row {i}: prompt must be a non-empty string, got {prompt!r}")
        n = row.get("max_new_tokens")
        n = params.get("max_new_tokens") if _missing(n) else n
        n = min(self.loaded.default_max_tokens, MAX_NEW_TOKENS_CAP) if _missing(n) else n
        conf = row.get("confidence")
        conf = params.get("confidence") if _missing(conf) else conf
        if _missing(conf):
            conf = self.loaded.default_confidence if self.loaded.default_confidence is not None else 1.0
        ids = encode_prompt(self.loaded.tokenizer, prompt)
        return Sequence(ids, check_max_new_tokens(n, f"row {i}"), check_confidence(conf, f"row {i}"))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        params = dict(params or {})
        for key, check in (("max_new_tokens", check_max_new_tokens), ("confidence", check_confidence)):
            if not _missing(params.get(key)):
                params[key] = check(params[key], "params")
        seqs = [self._sequence(i, row, params) for i, row in enumerate(pyfunc_rows(model_input))]
        slots = min(PYFUNC_MAX_BATCH, max(1, len(seqs)))
        longest = max((len(s.prompt_ids) for s in seqs), default=1)
        most = max((s.max_new_tokens for s in seqs), default=1)
        # shapes rounded up, so later calls of similar sizes reuse the slot batch (and its graphs)
        batch = self.loaded.batch("auto", slots, -(-longest // 64) * 64, 1 << (most - 1).bit_length())
        decode_all(batch, seqs, slots)
        tok = self.loaded.tokenizer
        return pd.DataFrame(
            [
                {
                    "text": tok.decode(s.tokens, skip_special_tokens=True),
                    "tokens": len(s.tokens),
                    "macro_steps": s.macro_steps,
                    "tokens_per_macro_step": s.tokens_per_macro_step,
                }
                for s in seqs
            ],
            columns=["text", "tokens", "macro_steps", "tokens_per_macro_step"],
        )


mlflow.models.set_model(HAMburgerPyfunc())
