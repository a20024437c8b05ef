"""The judge: one verdict for one model output, used offline (evaluation) and online (gateway).

    verdict = judge(text, schema, finish_reason="stop", expected={...})

Order of checks: did the text parse as JSON (a code fence around it counts as
invalid: clients parse the raw text)? if not, was generation cut off at
``max_tokens`` (``truncated``)? does it match the schema? and, when the expected
output is known, how many leaf fields are right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import re2
from jsonschema import ValidationError, validators

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


# Regular expressions in schemas (``pattern``, ``patternProperties``) run on RE2, whose time is linear in the
# text: a client's schema can never make a check backtrack for minutes. A pattern RE2 cannot run (lookaround,
# backreferences) is refused in client schemas before it gets here (``serving.outputs.schemas``); in a trusted schema
# (an adapter's manifest, the evaluation's) it falls back to Python's ``re``.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=1024)
def compiled_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2, else by ``re`` (trusted schemas only; see above)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        return re.compile(pattern)


def re2_unsupported(pattern: str) -> str | None:
    """Why RE2 cannot run ``pattern`` (``None`` when it can)."""
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        return exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    return None


def _matches(pattern: str, text: str) -> bool:
    return compiled_pattern(pattern).search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: dict[str, Any]) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra_schema: Any, instance: Any, schema: dict[str, Any]) -> Any:
    if not validator.is_type(instance, "object"):
        return
    known, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in known and not any(_matches(p, k) for p in patterns)]
    if validator.is_type(extra_schema, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], extra_schema, path=extra)
    elif not extra_schema and extras:
        names = ", ".join(repr(e) for e in sorted(extras, key=str))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(
                f"{names} {verb} not match any of the regexes: " + ", ".join(repr(p) for p in sorted(patterns))
            )
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")


@lru_cache(maxsize=16)
def _with_re2(cls: Any) -> Any:
    """The draft's validator class with its regex keywords on RE2."""
    return validators.extend(
        cls,
        {"pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties},
    )


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    cls = _with_re2(validators.validator_for(schema))
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
