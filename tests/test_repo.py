"""The repository's documents: the README's commands are the ones CI runs, the configuration
reference matches the code, and README.md + docs/*.md are self-contained (no internal issue
numbers, no paths outside the repository, no broken relative links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "issue 10", "Issues 11.6", "issue #12", "(#10)", "see #3"; not "## 1. Heading", "&#123;",
# "a.md#1-intro", "page#12", nor colour codes (stripped first, see without_colours).
ISSUE_REF = re.compile(r"\b[Ii]ssues? #?\d+\b|(?<![\w/&#])#\d+\b(?![\w-])")
COLOUR = re.compile(r"(?i)(?:colou?r|background|fill|stroke)\s*[:=]\s*['\"]?#[0-9a-f]{3,8}\b|#[0-9a-f]{6}\b")
OUTSIDE = "../shared"
# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_colours(text: str) -> str:
    return COLOUR.sub("", text)


def issue_refs(text: str) -> list[str]:
    return [m.group(0) for m in ISSUE_REF.finditer(without_colours(text))]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up and tests", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
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


def test_documented_config_reference_is_current():
    from trainer.tools.configdoc import DOC, documented_block, reference

    assert documented_block() == reference().strip(), (
        f"the configuration reference in {DOC.relative_to(ROOT)} is out of date: run "
        f"`.venv/bin/python -m trainer.tools.configdoc` and paste its output between the "
        f"<!-- config-reference:start --> and <!-- config-reference:end --> markers there"
    )


@pytest.mark.parametrize(
    "text",
    ["see issue 10", "Issue #12 says", "issues 11.6 and 12", "fixed (#10)", "as in #3.", "#7 at the start"],
)
def test_issue_pattern_finds_internal_references(text):
    assert issue_refs(text), text


@pytest.mark.parametrize(
    "text",
    [
        "## 1. Heading",
        "#### Training (`./launch.sh train`)",
        "&#123; is an entity",
        "[intro](docs/training.md#1-resume)",
        "[intro](#2-resume)",
        "https://example.org/page#12",
        'style="color: #333"',
        "background:#0a0a0a",
        "the colour `#00ff00` and `#123456`",
        "`tests/test_repo.py::test_x` for issue-free text",
        "C# 10, 10#",
    ],
)
def test_issue_pattern_ignores_headings_anchors_and_colours(text):
    assert not issue_refs(text), (text, issue_refs(text))


def test_documents_name_no_internal_issues_or_outside_paths():
    bad = []
    for path in documents():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found = issue_refs(line) + ([OUTSIDE] if OUTSIDE in line else [])
            bad += [f"{path.relative_to(ROOT)}:{n}: {hit!r} in {line.strip()[:100]!r}" for hit in found]
    assert not bad, "internal issue numbers or paths outside the repository:\n" + "\n".join(bad)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids of a markdown file (headings inside code fences do not count)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_point_to_existing_files():
    broken = []
    for path in documents():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = path.parent / file if file else path
                if not dest.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_anchors_follow_github_slugs(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Self-distilled corpus (shipped)\n```bash\n# not a heading\n```\n## `x.py` and **y**\n## Notes\n## Notes\n"
    )
    assert anchors(doc) == {"self-distilled-corpus-shipped", "xpy-and-y", "notes", "notes-1"}


def test_link_pattern_reads_markdown_links():
    assert LINK.findall("see [a](docs/a.md), ![p](b.png) and [c](https://x/y.md#z)") == [
        "docs/a.md",
        "b.png",
        "https://x/y.md#z",
    ]


@pytest.mark.distributed
def test_launch_curves_and_replay_run_in_the_project_environment():
    """The README's `./launch.sh curves` / `replay` need no activated environment."""
    import subprocess
    import sys

    venv = {"HAMBURGER_VENV": str(Path(sys.executable).parent.parent), "PATH": "/usr/bin:/bin"}
    for cmd in (["curves"], ["replay"]):
        proc = subprocess.run(
            [str(ROOT / "launch.sh"), *cmd], capture_output=True, text=True, env=venv, timeout=300
        )
        assert f"usage: ./launch.sh {cmd[0]}" in proc.stderr, proc.stderr[-2000:]
