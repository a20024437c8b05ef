"""The gateway's online JSON check: the evaluation's judge (``contract.judge``) on every answer.

The schema comes from the request's ``response_format`` (``json_schema``, or
any JSON for ``json_object``), else from the adapter's manifest. The verdict
goes back to the client: an ``x-lorafleet-json`` header with the first choice's
outcome and a ``lorafleet`` object in the body (``json_checks``: per choice,
valid, outcome, errors with JSON paths); for a stream, in a last event before
``[DONE]`` shaped like a chunk with no choices, which OpenAI clients accept.

A client's schema with ``pattern`` keywords is left to vLLM's enforcement:
Python's ``re`` has no time bound, so a hostile pattern could stall the gateway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from contract.judge import judge
from contract.manifest import AdapterManifest


@dataclass
class JsonCheck:
    schema: dict[str, Any]
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    unchecked: bool = False

    @classmethod
    def for_request(cls, body: dict[str, Any], manifest: AdapterManifest) -> JsonCheck | None:
        schema = expected_schema(body, manifest)
        if schema is None:
            return None
        return cls(schema, unchecked=_has_regex(schema) and schema is not manifest.output_schema)

    @property
    def outcome(self) -> str:
        if self.unchecked:
            return "unchecked"
        return self.checks[0]["outcome"] if self.checks else "none"

    def judge_all(self, answers: list[tuple[int, str, str | None]]) -> list[dict[str, Any]]:
        if self.unchecked:
            return []
        self.checks = []
        for index, text, finish_reason in answers:
            verdict = judge(text, self.schema, finish_reason=finish_reason)
            self.checks.append({"index": index, "valid": verdict.outcome == "valid", "outcome": verdict.outcome,
                                "errors": verdict.errors})  # fmt: skip
        return self.checks

    def add_to_body(self, content: bytes) -> bytes:
        """A whole (non-streamed) response with the verdicts added."""
        if self.unchecked:
            return content
        data = json.loads(content)
        answers = [(c.get("index", 0), _text(c.get("message", {}).get("content") if "message" in c else c.get("text")),
                    c.get("finish_reason")) for c in data.get("choices", [])]  # fmt: skip
        data["lorafleet"] = {"json_checks": self.judge_all(answers)}
        return json.dumps(data).encode()

    def observe_event(self, event: bytes) -> None:
        """Collect one server-sent event's text deltas."""
        line = event.strip()
        if not line.startswith(b"data:"):
            return
        try:
            data = json.loads(line[5:])
        except json.JSONDecodeError:
            return
        for c in data.get("choices") or []:
            index = c.get("index", 0)
            delta = c["delta"].get("content") if "delta" in c else c.get("text")
            self.texts.setdefault(index, []).append(_text(delta))
            if c.get("finish_reason"):
                self.finish[index] = c["finish_reason"]

    def final_event(self) -> bytes:
        """The verdicts as the stream's last event (before ``[DONE]``)."""
        answers = [(i, "".join(parts), self.finish.get(i)) for i, parts in sorted(self.texts.items())]
        checks = self.judge_all(answers)
        event = {"object": "lorafleet.json_check", "choices": [],
                 "lorafleet": {"json_checks": checks, "outcome": self.outcome}}  # fmt: skip
        return b"data: " + json.dumps(event).encode() + b"\n\n"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def expected_schema(body: dict[str, Any], manifest: AdapterManifest) -> dict[str, Any] | None:
    """The schema an answer is checked against: the request's ``response_format``, else the adapter's own.

    ``{}`` (any JSON) for ``json_object``; ``None`` when no JSON is expected.
    """
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "text":
        return None
    return manifest.output_schema


def _has_regex(schema: Any) -> bool:
    if isinstance(schema, dict):
        return bool({"pattern", "patternProperties"} & schema.keys()) or any(_has_regex(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_regex(v) for v in schema)
    return False
