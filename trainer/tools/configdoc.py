"""Markdown reference of every config field, its default and its docstring.

python -m trainer.tools.configdoc        (the README's "Configuration reference" is this output)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def rows(obj, prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += rows(value, name + ".")
        else:
            out.append((name, json.dumps(value), docs.get(f.name, "")))
    return out


def reference() -> str:
    from data_prep.config import FilterConfig, PrepConfig, SourceConfig
    from trainer.evaluate.evaluate import EvalConfig
    from trainer.train.config import TrainConfig

    parts = []
    for title, obj in [
        ("Training (`./launch.sh train`, `trainer/train/config.py`)", TrainConfig()),
        ("Data prep (`./launch.sh prep`, `data_prep/config.py`)", PrepConfig()),
        ("Each entry of `sources:`", SourceConfig()),
        ("Each entry of a source's `filters:`", FilterConfig()),
        ("Eval (`./launch.sh eval`, `trainer/evaluate/evaluate.py`)", EvalConfig()),
    ]:
        parts += [f"#### {title}", "", "| key | default | meaning |", "|---|---|---|"]
        parts += [f"| `{k}` | `{v}` | {d.replace('|', '/')} |" for k, v, d in rows(obj)]
        parts.append("")
    return "\n".join(parts)


README_START = "<!-- config-reference:start -->"
README_END = "<!-- config-reference:end -->"


def readme_block() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip()


if __name__ == "__main__":
    print(reference())
