"""The habits that keep the house in order: the pre-commit hooks run what `make lint` runs, the changelog reads
newest first, every decision record is in its index, and the formatter owns the layout."""

from __future__ import annotations

import re
import subprocess
from datetime import date

import yaml

from tests.conftest import ROOT


def lint_commands() -> list[str]:
    """The Makefile's lint recipe, as module invocations (``ruff check``, ...)."""
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    return [re.sub(r"\s+\.$", "", line.split(" -m ", 1)[1]).strip() for line in recipe.group(1).splitlines()]


def test_pre_commit_runs_what_make_lint_runs() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    entries = [hook["entry"].split(" -m ", 1)[1] for hook in hooks]
    assert entries == lint_commands() == ["ruff check", "ruff format --check", "mypy"]
    assert all(hook["entry"].startswith(".venv/bin/python -m ") for hook in hooks)  # the pinned tools


def test_the_changelog_reads_newest_first() -> None:
    sections = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert sections[0] == "Unreleased"
    dates = [date.fromisoformat(s) for s in sections[1:]]
    assert dates == sorted(dates, reverse=True) and len(set(dates)) == len(dates)


def test_every_decision_record_is_in_the_index() -> None:
    adr = ROOT / "docs" / "adr"
    index = (adr / "README.md").read_text()
    records = sorted(p.name for p in adr.glob("[0-9][0-9][0-9][0-9]-*.md"))
    assert records and sorted(re.findall(r"\]\(([0-9]{4}-[^)]+\.md)\)", index)) == records
    numbers = [name[:4] for name in records]
    assert numbers == [f"{i:04d}" for i in range(1, len(records) + 1)]  # numbered in order, none skipped


def test_the_formatter_owns_the_layout() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, cwd=ROOT, check=True)
    skipped = [f for f in tracked.stdout.split() if re.search(r"#\s*fmt:\s*(skip|off)", (ROOT / f).read_text())]
    assert not skipped, f"configure the formatter instead of opting out of it: {skipped}"
