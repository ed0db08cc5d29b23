"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up and tests", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if "launch.sh test" in line]
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert readme_test_command() in ci


def test_launch_script_is_executable():
    assert (ROOT / "launch.sh").stat().st_mode & 0o111
    assert (ROOT / ".ci/run").stat().st_mode & 0o111


def test_readme_config_reference_is_current():
    from trainer.tools.configdoc import readme_block, reference

    assert readme_block() == reference().strip(), (
        "run: python -m trainer.tools.configdoc and paste it into the README"
    )
