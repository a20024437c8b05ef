"""The docs a newcomer reads: every relative link resolves, and every `lorafleet` option they show exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from lorafleet.cli import app
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text("utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: move the manual to docs/"
    for page in PAGES[2:]:
        first = [line for line in page.read_text("utf-8").splitlines() if line.strip()][:2]
        assert first[0].startswith("# ") and not first[1].startswith("#"), f"{page}: a title, then what it is for"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    text = FENCE.sub("", page.read_text("utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _command_lines(text: str) -> list[str]:
    """Every `lorafleet ...` command shown, in code blocks (continuations joined) and in inline code."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            if line.startswith(("lorafleet ", "python -m lorafleet ")):
                found.append(line)
    found += [m for m in re.findall(r"`((?:python -m )?lorafleet [^`]+)`", FENCE.sub("", text))]
    return found


def _options(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


def test_every_option_the_docs_show_exists() -> None:
    root = typer.main.get_command(app)
    problems = []
    for page in PAGES:
        for line in _command_lines(page.read_text("utf-8")):
            line = line.split("#", 1)[0].split("|", 1)[0].split(">", 1)[0]
            try:
                words = shlex.split(line.replace("...", "").replace("…", ""))
            except ValueError:
                words = line.split()
            words = words[words.index("lorafleet") + 1 :]
            command: Any = root  # typer's own click: groups are the commands that have .commands
            while hasattr(command, "commands") and words and words[0] in command.commands:
                command = command.commands[words.pop(0)]
            if hasattr(command, "commands"):
                if words and not words[0].startswith("-"):
                    problems.append(f"{page.name}: `{line.strip()}`: no command {words[0]!r}")
                continue
            for word in words:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and flag not in _options(command) and re.fullmatch(r"--[a-z0-9-]+", flag):
                    problems.append(f"{page.name}: `{line.strip()}`: {command.name} has no {flag}")
    assert not problems, "\n".join(problems)
