"""Example files: read every supported shape, check every row, report every problem at once.

    lorafleet data check data/orders/train.jsonl --schema data/orders/schema.json

Accepted files: JSON Lines, or one JSON array, of rows in one of these shapes

    {"instruction", "input"?, "output", "schema"?, "id"?}     the seed format
    {"prompt", "completion", "schema"?, "id"?}
    {"messages": [...], "tools"?, "schema"?, "id"?}           chat; the last turn is the assistant's answer

Training and evaluation read data through here. Function-calling files (glaive,
BFCL) become chat rows with ``tools`` through
``training.toolcall``. A row's ``schema`` (or ``--schema`` for the whole file)
is the JSON Schema its output must match.

Each problem names the file, the line, the field, what is wrong and what to do.
Errors stop training (unless ``--skip-invalid`` drops those rows); warnings
(too few examples) do not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonschema.exceptions import SchemaError

from contract.judge import check_schema, judge
from contract.prompt import Message, example_messages

SHAPES = {
    "instruction": ({"instruction", "output"}, {"input", "schema", "id"}),
    "prompt": ({"prompt", "completion"}, {"schema", "id"}),
    "chat": ({"messages"}, {"tools", "schema", "id"}),
}
ROLES = {"system", "user", "assistant", "tool"}
MIN_EXAMPLES = 100


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str | None
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {self.severity}: {what}{self.message}; fix: {self.fix}"


@dataclass
class Example:
    """One training example, whatever shape it came in."""

    messages: list[Message]
    completion: str
    schema: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    line: int = 0
    id: str | None = None

    def key(self) -> str:
        return json.dumps([self.messages, self.tools, self.completion], sort_keys=True)


@dataclass
class CheckReport:
    path: Path
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def invalid_lines(self) -> set[int | None]:
        return {p.line for p in self.errors}


class DataError(ValueError):
    """The data has errors; ``report`` holds every one of them."""

    def __init__(self, report: CheckReport, fix: str = "Fix them, or pass --skip-invalid to drop those rows.") -> None:
        self.report = report
        lines = "\n  ".join(str(p) for p in report.errors)
        super().__init__(f"{len(report.errors)} problem(s) in {report.path} ({report.rows} rows):\n  {lines}\n{fix}")


def jsonl_text(rows: list[Any]) -> str:
    """``rows`` as JSONL text: one JSON value per line, non-ASCII characters kept as they are."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_rows(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """``(line, value)`` for every row of a JSONL file or JSON array, and the rows that are not JSON."""
    text = Path(path).read_text("utf-8")
    rows: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    if text.lstrip().startswith("["):
        decoder = json.JSONDecoder()
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(
                Problem(
                    str(path),
                    exc.lineno,
                    None,
                    f"not valid JSON ({exc.msg}, column {exc.colno})",
                    "repair the JSON array, or write one JSON object per line (JSONL)",
                )
            )
            return rows, problems
        idx = text.index("[") + 1
        while True:
            while idx < len(text) and text[idx] in " \t\r\n,":
                idx += 1
            if idx >= len(text) or text[idx] == "]":
                break
            value, end = decoder.raw_decode(text, idx)
            rows.append((text.count("\n", 0, idx) + 1, value))
            idx = end
        return rows, problems
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(
                Problem(
                    str(path),
                    lineno,
                    None,
                    f"not valid JSON ({exc.msg}, column {exc.colno})",
                    "repair the line or delete it; each line must be one JSON object",
                )
            )
    return rows, problems


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def to_example(row: Any, line: int, path: str, schema: dict[str, Any] | None) -> tuple[Example | None, list[Problem]]:
    """Normalise one row; returns the example (``None`` if unusable) and its problems."""

    def problem(fld: str | None, message: str, fix: str) -> Problem:
        return Problem(path, line, fld, message, fix)

    if not isinstance(row, dict):
        return None, [problem(None, f"expected a JSON object, got {type(row).__name__}", "make the row an object")]
    shape = next((name for name, (required, _) in SHAPES.items() if required & row.keys()), None)
    if shape is None:
        return None, [
            problem(
                None,
                f"unknown row shape with fields {sorted(row)}",
                "use {instruction, output}, {prompt, completion} or {messages}",
            )
        ]
    required, optional = SHAPES[shape]
    problems = [
        problem(k, "unknown field", f"remove it or rename it to one of {sorted(required | optional)}")
        for k in sorted(row.keys() - required - optional)
    ]
    for k in sorted(required):
        if k == "messages":
            continue
        if k not in row:
            problems.append(problem(k, "missing", f"add a non-empty string '{k}'"))
        elif not _nonempty_str(row[k]):
            problems.append(problem(k, "empty or not a string", f"give '{k}' a non-empty string"))
    if shape == "instruction" and "input" in row and not isinstance(row["input"], str):
        problems.append(problem("input", "not a string", "make 'input' a string or remove it"))

    messages: list[Message] = []
    completion = ""
    if shape == "chat":
        messages, completion, chat_problems = _chat(row, problem)
        problems += chat_problems
    elif not problems:
        if shape == "instruction":
            messages, completion = example_messages(row), row["output"]
        else:
            messages, completion = [{"role": "user", "content": row["prompt"]}], row["completion"]

    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) and "name" in t for t in tools)):
        problems.append(problem("tools", "not a list of function specs", 'give [{"name", "parameters"}, ...]'))
    row_schema = row.get("schema", schema)
    if "schema" in row and not isinstance(row["schema"], dict):
        problems.append(problem("schema", "not a JSON object", "give a JSON Schema object or remove the field"))
        row_schema = None
    if problems:
        return None, problems
    if row_schema is not None:
        output_field = {"instruction": "output", "prompt": "completion", "chat": "messages[-1].content"}[shape]
        problems += _check_output(completion, row_schema, output_field, problem)
    example = Example(messages, completion, row_schema, tools, line, str(row["id"]) if "id" in row else None)
    return (None if problems else example), problems


def _chat(row: dict[str, Any], problem: Callable[..., Problem]) -> tuple[list[Message], str, list[Problem]]:
    turns = row["messages"]
    if not isinstance(turns, list) or len(turns) < 2:
        return (
            [],
            "",
            [
                problem(
                    "messages",
                    "needs at least a user turn and the assistant's answer",
                    "give [{role: user, content}, {role: assistant, content}]",
                )
            ],
        )
    problems = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            problems.append(
                problem(
                    f"messages[{i}]",
                    "not a {role, content} turn",
                    f"use a role in {sorted(ROLES)} and a string content",
                )
            )
    if problems:
        return [], "", problems
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        return (
            [],
            "",
            [
                problem(
                    f"messages[{len(turns) - 1}]",
                    "the last turn is not a non-empty assistant answer",
                    "end each conversation with the assistant turn to learn",
                )
            ],
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns[:-1]], turns[-1]["content"], []


def _check_output(completion: str, schema: dict[str, Any], fld: str, problem: Callable[..., Problem]) -> list[Problem]:
    try:
        verdict = judge(completion, schema)
    except SchemaError as exc:
        return [problem("schema", f"not a valid JSON Schema: {exc.message}", "fix the schema")]
    if verdict.outcome == "invalid_json":
        return [
            problem(
                fld,
                f"output is not JSON but a schema is given ({verdict.errors[0]})",
                "write the output as one JSON value, with no code fence or prose",
            )
        ]
    return [
        problem(fld, f"output violates its schema at {err}", "correct the output or the schema")
        for err in verdict.errors
    ]


def check(
    path: Path,
    *,
    schema: dict[str, Any] | None = None,
    token_length: Callable[[Example], int] | None = None,
    max_length: int | None = None,
    min_examples: int = MIN_EXAMPLES,
) -> CheckReport:
    """Read and check every row of ``path``; the report holds the good examples and every problem."""
    path = Path(path)
    report = CheckReport(path)
    if schema is not None:
        try:
            check_schema(schema)
        except SchemaError as exc:
            report.problems.append(
                Problem(str(path), None, "--schema", f"not a valid JSON Schema: {exc.message}", "fix the schema file")
            )
            return report
    rows, report.problems = read_rows(path)
    report.rows = len(rows) + len(report.problems)
    seen: dict[str, int] = {}
    for line, row in rows:
        example, problems = _check_row(path, line, row, seen, schema, token_length, max_length)
        report.problems += problems
        if example is not None:
            report.examples.append(example)
    if len(report.examples) < min_examples:
        report.problems.append(
            Problem(
                str(path),
                None,
                None,
                f"only {len(report.examples)} usable examples",
                f"use hundreds to thousands; under {min_examples} an adapter rarely generalises",
                "warning",
            )
        )
    report.problems.sort(key=lambda p: p.line or 0)
    return report


def _check_row(
    path: Path,
    line: int,
    row: Any,
    seen: dict[str, int],
    schema: dict[str, Any] | None,
    token_length: Callable[[Example], int] | None,
    max_length: int | None,
) -> tuple[Example | None, list[Problem]]:
    """One row: its example (``None`` if unusable) and its problems; ``seen`` keeps the first line of each
    example, in either shape, to find duplicates."""
    first = seen.setdefault(json.dumps(row, sort_keys=True), line)
    if first != line:
        return None, [Problem(str(path), line, None, f"duplicate of line {first}", "delete the repeated example")]
    example, problems = to_example(row, line, str(path), schema)
    if example is None:
        return None, problems
    first = seen.setdefault(example.key(), line)
    if first != line:  # the same example in another shape
        return None, [
            *problems,
            Problem(str(path), line, None, f"duplicate of line {first}", "delete the repeated example"),
        ]
    if token_length is not None and max_length is not None and (n := token_length(example)) > max_length:
        too_long = f"{n} tokens after rendering, over max_length {max_length}"
        return None, [*problems, Problem(str(path), line, None, too_long, "shorten the example or raise --max-length")]
    return example, problems
