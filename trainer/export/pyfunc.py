"""The MLflow pyfunc's contract: its signature, the spec it is logged with, and the checks on
every input row (a bad row is an MlflowException, a 400 under `mlflow models serve`).
The pyfunc itself is trainer/export/pyfunc_model.py ("models from code": no pickle).
"""

from __future__ import annotations

import math
from pathlib import Path

from hamburger.model.config import check_confidence as model_check_confidence

MAX_NEW_TOKENS_CAP = 1024
"""The pyfunc's cap on max_new_tokens (a request over it is refused, never run)."""
PYFUNC_MAX_BATCH = 16
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def pyfunc_signature():
    """Input: `prompt` (string), optional `max_new_tokens` and `confidence` (any type: MLflow's
    own enforcement would refuse an integer column for a double and truncate 2.5 for a long, so
    both reach pyfunc_model's checks as sent, where a row that omits one gets the default and a
    bad value is refused naming row and field). Request-level params (same names) fill rows that
    omit them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec(AnyType(), "max_new_tokens", required=False),
            ColSpec(AnyType(), "confidence", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "text"),
            ColSpec("long", "tokens"),
            ColSpec("long", "macro_steps"),
            ColSpec("double", "tokens_per_macro_step"),
        ]
    )
    params = ParamSchema([ParamSpec("max_new_tokens", "long", None), ParamSpec("confidence", "double", None)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pyfunc_spec(folder: str | Path) -> dict:
    """Keyword arguments of mlflow.pyfunc.log_model / save_model for a model folder: models from
    code (the file trainer/export/pyfunc_model.py, no pickle), the folder as an artifact, the signature."""
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
    try:
        return model_check_confidence(v, where)
    except ValueError as e:
        raise _bad_input(str(e)) from None


def pyfunc_rows(model_input) -> list[dict]:
    """Rows as dicts from a DataFrame (what MLflow passes once the signature is enforced), or
    from a list of strings or dicts, or one string (the model called without MLflow's wrapper)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise _bad_input(f"the input has no `prompt` column (columns: {list(model_input.columns)})")
        return model_input.to_dict("records")
    items = model_input if isinstance(model_input, list) else [model_input]
    return [item if isinstance(item, dict) else {"prompt": item} for item in items]
