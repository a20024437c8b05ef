"""The judge: one verdict for one model output, used offline (evaluation) and online (gateway).

    verdict = judge(text, schema, finish_reason="stop", expected={...})

Order of checks: did the text parse as JSON (a code fence around it counts as
invalid: clients parse the raw text)? if not, was generation cut off at
``max_tokens`` (``truncated``)? does it match the schema? and, when the expected
output is known, how many leaf fields are right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from jsonschema import validators

Outcome = Literal["valid", "invalid_json", "schema_mismatch", "truncated"]
OUTCOMES: tuple[Outcome, ...] = ("valid", "invalid_json", "schema_mismatch", "truncated")


@dataclass
class Verdict:
    outcome: Outcome
    parsed: Any = None
    errors: list[str] = field(default_factory=list)
    field_accuracy: float | None = None
    exact_match: bool | None = None

    @property
    def parsed_ok(self) -> bool:
        return self.outcome in ("valid", "schema_mismatch")


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ``jsonschema.SchemaError`` if ``schema`` is not a valid JSON Schema."""
    _validator(json.dumps(schema, sort_keys=True))


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every way ``instance`` violates ``schema``, each as ``<json path>: <message>``."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    return [
        f"{err.json_path}: {err.message}"
        for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


def _leaves(value: Any, prefix: str = "$") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, sub in enumerate(value):
            out.update(_leaves(sub, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def field_accuracy(actual: Any, expected: Any) -> float:
    """Share of leaf paths (expected ∪ actual) whose values agree: missing and extra fields count wrong."""
    want, got = _leaves(expected), _leaves(actual)
    paths = set(want) | set(got)
    if not paths:
        return 1.0
    right = sum(1 for p in paths if p in want and p in got and want[p] == got[p])
    return right / len(paths)


def field_differences(actual: Any, expected: Any) -> list[str]:
    """Each leaf path where ``actual`` differs from ``expected``: wrong value, missing or extra."""
    want, got = _leaves(expected), _leaves(actual)
    out = []
    for path in sorted(set(want) | set(got)):
        if path not in got:
            out.append(f"{path}: missing (expected {want[path]!r})")
        elif path not in want:
            out.append(f"{path}: extra ({got[path]!r})")
        elif want[path] != got[path]:
            out.append(f"{path}: expected {want[path]!r}, got {got[path]!r}")
    return out


def judge(
    text: str,
    schema: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    expected: Any = None,
) -> Verdict:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        outcome: Outcome = "truncated" if finish_reason == "length" else "invalid_json"
        return Verdict(outcome, errors=[f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"])
    verdict = Verdict("valid", parsed=parsed)
    if schema is not None:
        verdict.errors = schema_errors(parsed, schema)
        if verdict.errors:
            verdict.outcome = "schema_mismatch"
    if expected is not None:
        verdict.field_accuracy = field_accuracy(parsed, expected)
        verdict.exact_match = _canonical(parsed) == _canonical(expected)
    return verdict


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
