"""Markdown reference of every config field, its default and its docstring.

.venv/bin/python -m trainer.tools.configdoc

prints it; docs/configuration.md holds this output between the config-reference markers, and
tests/test_repo.py fails when the two differ.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


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


def find_class(package: str, name: str) -> type:
    """The class `name` defined in `package` or one of its modules (first by module name)."""
    pkg = importlib.import_module(package)
    if isinstance(getattr(pkg, name, None), type):
        return getattr(pkg, name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "__main__":
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and cls.__module__ == mod.__name__:
            return cls
    raise ImportError(f"no class {name} in {package}")


def source_path(cls) -> str:
    """The file defining cls, relative to the repository root."""
    return Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT).as_posix()


def reference() -> str:
    from data_prep.config import FilterConfig, PrepConfig, SourceConfig
    from trainer.train.config import TrainConfig

    EvalConfig = find_class("trainer.evaluate", "EvalConfig")

    parts = []
    for title, cls in [
        ("Training (`./launch.sh train`, `{path}`)", TrainConfig),
        ("Data prep (`./launch.sh prep`, `{path}`)", PrepConfig),
        ("Each entry of `sources:`", SourceConfig),
        ("Each entry of a source's `filters:`", FilterConfig),
        ("Eval (`./launch.sh eval`, `{path}`)", EvalConfig),
    ]:
        title = title.format(path=source_path(cls))
        parts += [f"#### {title}", "", "| key | default | meaning |", "|---|---|---|"]
        parts += [f"| `{k}` | `{v}` | {d.replace('|', '/')} |" for k, v, d in rows(cls())]
        parts.append("")
    return "\n".join(parts)


def documented_block(path: Path = DOC) -> str:
    """The reference as pasted into docs/configuration.md (between START and END)."""
    text = path.read_text()
    if START not in text or END not in text:
        raise AssertionError(f"{path} lacks the markers {START} ... {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    print(reference())
