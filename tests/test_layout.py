"""The layout stays readable: no module over 500 lines, the loops that readers start from stay
short (Trainer.fit, create_app), each command has its own folder with an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
COMMANDS = ("train", "export", "evaluate", "serve")


def _python_files() -> list[Path]:
    return sorted(p for d in ("hamburger", "data_prep", "trainer", "bench") for p in (ROOT / d).rglob("*.py"))


def _function_lines(path: Path, qualname: str) -> int:
    tree = ast.parse(path.read_text())
    node: ast.AST = tree
    for part in qualname.split("."):
        node = next(n for n in ast.iter_child_nodes(node) if getattr(n, "name", None) == part)
    return node.end_lineno - node.lineno + 1


def test_no_module_over_the_limit():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in _python_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines each):\n" + "\n".join(long)


@pytest.mark.parametrize(
    "path, qualname, limit",
    [
        ("trainer/train/trainer.py", "Trainer.fit", 30),
        ("trainer/serve/app.py", "create_app", 60),
    ],
)
def test_entry_loops_stay_short(path: str, qualname: str, limit: int):
    n = _function_lines(ROOT / path, qualname)
    assert n <= limit, f"{path}::{qualname} is {n} lines (at most {limit}): move a job into a component"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_folder_and_entry_point(command: str):
    folder = ROOT / "trainer" / command
    assert (folder / "__init__.py").is_file() and (folder / "__main__.py").is_file()
    launch = (ROOT / "launch.sh").read_text()
    assert f"trainer.{command} " in launch or f"trainer.{command}\n" in launch, (
        f"launch.sh does not run `python -m trainer.{command}`"
    )


def test_one_class_per_name_across_commands():
    """Two classes of one name in different rooms (two `Engine`s) make a newcomer guess."""
    seen: dict[str, list[str]] = {}
    for p in _python_files():
        if p.parts[len(ROOT.parts)] == "bench":
            continue
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(str(p.relative_to(ROOT)))
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    assert not twice, f"classes defined in more than one module: {twice}"
