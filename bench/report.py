"""Write a benchmark's section into docs/BENCHMARKS.md (replacing its previous numbers)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nEach section is rewritten by the command named in it. "
    "Ratios come from one run, side by side.\n"
)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` with body, stamped with date, machine and command."""
    command = "python " + " ".join(sys.argv)
    stamp = f"{datetime.date.today().isoformat()} · {machine()}"
    block = (
        f"<!-- bench:{name} -->\n## {name}\n\n`{command}` — {stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    )
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
