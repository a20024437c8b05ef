"""Example files: read every supported shape, check every row, report every problem at once.

    lorafleet data check data/orders/train.jsonl --schema data/orders/schema.json

Accepted files: JSON Lines, or one JSON array, of rows in one of these shapes

    {"instruction", "input"?, "output", "schema"?, "id"?}     the seed format
    {"prompt", "completion", "schema"?, "id"?}
    {"messages": [...], "tools"?, "parallel_tool_calls"?, "schema"?, "id"?}
                                                              chat, as OpenAI's fine-tuning format defines it

A chat row is learned as OpenAI learns it: every assistant turn is an answer
to learn (given the turns before it) unless it carries ``"weight": 0``; an
assistant turn may answer with ``tool_calls`` (learned as the
``{"name", "arguments"}`` object the gateway turns back into ``tool_calls``),
and ``tools`` may be OpenAI's ``[{"type": "function", "function": {...}}]`` or
this project's ``[{"name", "parameters"}]``. A row with several learned turns
becomes one example per learned turn.

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
from contract.tools import call_schema, call_text, function_of

SHAPES = {
    "instruction": ({"instruction", "output"}, {"input", "schema", "id"}),
    "prompt": ({"prompt", "completion"}, {"schema", "id"}),
    "chat": ({"messages"}, {"tools", "parallel_tool_calls", "schema", "id"}),
}
ROLES = {"system", "user", "assistant", "tool"}
# The keys a chat turn may carry, by role (OpenAI's training format).
TURN_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "weight", "tool_calls"},
    "tool": {"role", "content", "name", "tool_call_id"},
}
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
        except RecursionError:
            return rows, [Problem(str(path), None, None, "nested too deeply to read", "flatten the file's JSON")]
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
        at_line, counted = 1, 0  # the line at ``counted``, carried forward (counting from 0 per row is quadratic)
        while True:
            while idx < len(text) and text[idx] in " \t\r\n,":
                idx += 1
            if idx >= len(text) or text[idx] == "]":
                break
            value, end = decoder.raw_decode(text, idx)
            at_line += text.count("\n", counted, idx)
            counted = idx
            rows.append((at_line, value))
            idx = end
        return rows, problems
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except RecursionError:
            problems.append(Problem(str(path), lineno, None, "nested too deeply to read", "flatten the row's JSON"))
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


def to_examples(row: Any, line: int, path: str, schema: dict[str, Any] | None) -> tuple[list[Example], list[Problem]]:
    """Normalise one row into its examples (one per learned answer; none if unusable) and its problems."""

    def problem(fld: str | None, message: str, fix: str) -> Problem:
        return Problem(path, line, fld, message, fix)

    if not isinstance(row, dict):
        return [], [problem(None, f"expected a JSON object, got {type(row).__name__}", "make the row an object")]
    shape = next((name for name, (required, _) in SHAPES.items() if required & row.keys()), None)
    if shape is None:
        return [], [
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

    tools, tool_problems = _tools(row.get("tools"), problem)
    problems += tool_problems
    answers: list[tuple[list[Message], str]] = []
    if shape == "chat":
        answers, chat_problems = _chat(row, tools, problem)
        problems += chat_problems
    elif not problems:
        if shape == "instruction":
            answers = [(example_messages(row), row["output"])]
        else:
            answers = [([{"role": "user", "content": row["prompt"]}], row["completion"])]

    if "parallel_tool_calls" in row and not isinstance(row["parallel_tool_calls"], bool):
        problems.append(problem("parallel_tool_calls", "not true or false", "give a boolean or remove the field"))
    row_schema = row.get("schema", schema)
    if "schema" in row and not isinstance(row["schema"], dict):
        problems.append(problem("schema", "not a JSON object", "give a JSON Schema object or remove the field"))
        row_schema = None
    if problems:
        return [], problems
    examples = []
    for messages, completion in answers:
        if row_schema is not None:
            output_field = {"instruction": "output", "prompt": "completion", "chat": "messages[-1].content"}[shape]
            problems += _check_output(completion, row_schema, output_field, problem)
        examples.append(Example(messages, completion, row_schema, tools, line, str(row["id"]) if "id" in row else None))
    return ([] if problems else examples), problems


def _tools(tools: Any, problem: Callable[..., Problem]) -> tuple[list[dict[str, Any]] | None, list[Problem]]:
    """The row's functions as the prompt presents them: OpenAI's ``{"type": "function", "function": {...}}``
    entries unwrapped, this project's ``{"name", "parameters"}`` ones as they are."""
    if tools is None:
        return None, []
    fix = 'give [{"type": "function", "function": {"name", "parameters"}}, ...]'
    if not isinstance(tools, list) or not tools:
        return None, [problem("tools", "not a non-empty list of function specs", fix)]
    functions = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]):
            return None, [problem(f"tools[{i}]", "not a function spec with a name", fix)]
        functions.append(function_of(spec) if spec is not tool else tool)
    return functions, []


def _chat(
    row: dict[str, Any], tools: list[dict[str, Any]] | None, problem: Callable[..., Problem]
) -> tuple[list[tuple[list[Message], str]], list[Problem]]:
    """A conversation's learned answers, each with the turns before it (earlier calls written as answered)."""
    turns = row["messages"]
    if not isinstance(turns, list) or len(turns) < 2:
        return [], [
            problem(
                "messages",
                "needs at least a user turn and the assistant's answer",
                "give [{role: user, content}, {role: assistant, content}]",
            )
        ]
    problems: list[Problem] = []
    history: list[Message] = []
    answers: list[tuple[list[Message], str]] = []
    for i, turn in enumerate(turns):
        text, learned, turn_problems = _turn(turn, f"messages[{i}]", tools, problem)
        problems += turn_problems
        if turn_problems:
            continue
        if learned and not problems:
            answers.append((list(history), text))
        history.append({"role": turn["role"], "content": text})
    if problems:
        return [], problems
    last = turns[-1]
    if last["role"] != "assistant":
        return [], [
            problem(
                f"messages[{len(turns) - 1}]",
                "the last turn is not an assistant answer",
                "end each conversation with the assistant turn to learn",
            )
        ]
    if not answers:
        return [], [
            problem("messages", "every assistant turn has weight 0: nothing to learn", "give one turn weight 1")
        ]
    return answers, []


def _turn(
    turn: Any, where: str, tools: list[dict[str, Any]] | None, problem: Callable[..., Problem]
) -> tuple[str, bool, list[Problem]]:
    """One chat turn: its text as the prompt shows it, whether it is a learned answer, and its problems."""
    if not isinstance(turn, dict) or turn.get("role") not in ROLES:
        return "", False, [problem(where, "not a {role, content} turn", f"use a role in {sorted(ROLES)}")]
    role = turn["role"]
    unknown = sorted(turn.keys() - TURN_KEYS[role])
    if unknown:
        return "", False, [problem(f"{where}.{unknown[0]}", f"not a key of a {role} turn", "remove it")]
    calls = turn.get("tool_calls")
    if calls is not None:
        return _call_turn(turn, where, tools, problem)
    content = turn.get("content")
    if not isinstance(content, str) or (role == "assistant" and not content.strip()):
        fix = "give a non-empty string content (or tool_calls)" if role == "assistant" else "give a string content"
        return "", False, [problem(f"{where}.content", "missing, empty or not a string", fix)]
    weight = turn.get("weight", 1)
    if role == "assistant" and (weight not in (0, 1) or isinstance(weight, bool)):
        return "", False, [problem(f"{where}.weight", f"{weight!r} is not 0 or 1", "use 0 (not learned) or 1")]
    return content, role == "assistant" and weight == 1, []


def _call_turn(
    turn: dict[str, Any], where: str, tools: list[dict[str, Any]] | None, problem: Callable[..., Problem]
) -> tuple[str, bool, list[Problem]]:
    """An assistant turn answering with ``tool_calls``: one call to one of the row's tools, with JSON arguments."""
    calls = turn["tool_calls"]
    field_ = f"{where}.tool_calls"
    if turn["role"] != "assistant":
        return "", False, [problem(field_, "only an assistant turn calls tools", "remove it")]
    if not tools:
        return "", False, [problem("tools", "the row calls tools but lists none", "add the row's 'tools'")]
    fix = 'give [{"id", "type": "function", "function": {"name", "arguments": "<JSON object>"}}]'
    if not isinstance(calls, list) or not calls:
        return "", False, [problem(field_, "not a non-empty list of calls", fix)]
    if len(calls) > 1:
        return (
            "",
            False,
            [
                problem(
                    field_,
                    f"{len(calls)} calls in one turn; the gateway serves one call per answer",
                    "split the calls into consecutive assistant turns (each followed by its tool turn)",
                )
            ],
        )
    fn = calls[0].get("function") if isinstance(calls[0], dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return "", False, [problem(field_, "the call has no function with string arguments", fix)]
    names = {t["name"]: t for t in tools}
    if fn.get("name") not in names:
        return "", False, [problem(f"{field_}[0].function.name", f"{fn.get('name')!r} is not in tools", "name one")]
    try:
        arguments = json.loads(fn["arguments"])
    except json.JSONDecodeError as exc:
        return "", False, [problem(f"{field_}[0].function.arguments", f"not JSON ({exc.msg})", fix)]
    if not isinstance(arguments, dict):
        return "", False, [problem(f"{field_}[0].function.arguments", "not a JSON object", fix)]
    text = call_text(calls)
    weight = turn.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        return "", False, [problem(f"{where}.weight", f"{weight!r} is not 0 or 1", "use 0 (not learned) or 1")]
    verdict = judge(text, call_schema(names[fn["name"]]))
    wrong = [
        problem(f"{field_}[0].function.arguments", f"violates the tool's parameters at {e}", "correct it")
        for e in verdict.errors
    ]
    return text, weight == 1, wrong


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
        examples, problems = _check_row(path, line, row, seen, schema, token_length, max_length)
        report.problems += problems
        report.examples += examples
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
) -> tuple[list[Example], list[Problem]]:
    """One row: its examples (none if unusable) and its problems; ``seen`` keeps the first line of each
    example, in either shape, to find duplicates."""
    first = seen.setdefault(json.dumps(row, sort_keys=True), line)
    if first != line:
        return [], [Problem(str(path), line, None, f"duplicate of line {first}", "delete the repeated example")]
    examples, problems = to_examples(row, line, str(path), schema)
    for example in examples:
        first = seen.setdefault(example.key(), line)
        if first != line:  # the same example in another shape
            return [], [
                *problems,
                Problem(str(path), line, None, f"duplicate of line {first}", "delete the repeated example"),
            ]
        if token_length is not None and max_length is not None and (n := token_length(example)) > max_length:
            too_long = f"{n} tokens after rendering, over max_length {max_length}"
            fix = "shorten the example or raise --max-length"
            return [], [*problems, Problem(str(path), line, None, too_long, fix)]
    return examples, problems
