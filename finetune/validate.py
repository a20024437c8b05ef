"""The ``validating_files`` step: a job's files read and checked as ``lorafleet data check`` checks them.

Run by the worker (no model needed, no torch): every row parsed and checked
(shape, roles, weights, tool calls, schemas), duplicates found. Token lengths
need the base model's tokenizer and are checked when the training starts; a
row too long fails the job then, the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.examples import CheckReport, Problem, check

FIRST_ERRORS = 10  # how many of a bad file's problems the job's error lists


def described(problems: list[Problem], file_id: str) -> list[str]:
    """Problems as a person reads them, naming the file by its id (never the server's path)."""
    lines = []
    for p in problems:
        where = f"line {p.line}" if p.line else "the file"
        what = f"field '{p.field}': " if p.field else ""
        lines.append(f"{where}: {what}{p.message}; fix: {p.fix}")
    return lines


def file_error(report: CheckReport, file_id: str, param: str) -> dict[str, Any]:
    """The job's ``error`` object for a file with errors: the first ones, with their line numbers."""
    errors = report.errors
    shown = described(errors[:FIRST_ERRORS], file_id)
    more = f" (and {len(errors) - FIRST_ERRORS} more)" if len(errors) > FIRST_ERRORS else ""
    return {
        "code": "invalid_file",
        "param": param,
        "message": f"{param} {file_id} has {len(errors)} problem(s) in {report.rows} rows{more}: " + " | ".join(shown),
    }


def check_file(path: Path, schema: dict[str, Any] | None = None) -> CheckReport:
    """Every row of the file at ``path`` checked (against ``schema``, the job's ``lorafleet.schema``, if any)."""
    return check(path, schema=schema)
