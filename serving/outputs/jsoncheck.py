"""The gateway's JSON handling for one request: which schema, which mode, and the online check.

``JsonPlan.for_request`` picks the schema and the mode (see ``serving.state.policies``
for the order) and rewrites the body sent to vLLM: ``enforce`` asks for
structured outputs with the schema, ``validate`` and ``off`` send none.
``JsonCheck`` then runs the evaluation's judge (``contract.judge``) on every
answer. The verdict goes back to the client: ``x-lorafleet-json`` (the first
choice's outcome) and ``x-lorafleet-json-mode`` headers and a ``lorafleet``
object in the body (``json_checks``: per choice, valid, outcome, errors with
JSON paths); for a stream, in a last event before ``[DONE]`` shaped like a chunk
with no choices, which OpenAI clients accept.

Every answer gets a verdict: ``pattern`` keywords run on RE2 (linear time,
``contract.judge``), so a client's schema cannot stall the check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from contract.judge import judge
from contract.settings import laid_out
from serving.outputs.modes import AliasPolicy, JsonMode
from serving.outputs.toolcalls import ToolPlan


@dataclass(frozen=True)
class JsonPlan:
    schema: dict[str, Any] | None
    mode: JsonMode
    source: str  # request, tools, alias (admin-set default) or adapter (manifest)
    unenforced: tuple[str, ...] = ()  # keywords the engine could not enforce: served in validate mode instead

    @classmethod
    def for_request(
        cls,
        body: dict[str, Any],
        output_schema: dict[str, Any] | None,
        policy: AliasPolicy,
        mode: JsonMode | None = None,
        tools: ToolPlan | None = None,
        layout: dict[str, Any] | None = None,
    ) -> JsonPlan:
        """The plan for ``body``, which is rewritten for the engine (``response_format`` set or removed).

        ``output_schema``: the adapter manifest's schema (``None`` for the base model); ``layout``: the
        whitespace enforced JSON may hold (``GatewaySettings.json_layout``).
        """
        fmt = body.pop("response_format", None)
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        schema: dict[str, Any] | None
        if tools is not None:
            schema, source = tools.schema, "tools"
        elif kind == "json_schema":
            given = (fmt.get("json_schema") or {}).get("schema")
            schema, source = (given if isinstance(given, dict) else {}), "request"
        elif kind == "json_object":
            schema, source = {}, "request"
        elif kind == "text":
            schema, source = None, "request"
        elif policy.default_schema is not None:
            schema, source = policy.default_schema, "alias"
        else:
            schema, source = output_schema, "adapter"
        chosen = mode or policy.json_mode or ("enforce" if source in ("request", "tools") else "validate")
        plan = cls(schema, chosen if schema is not None else "off", source)
        if plan.mode == "enforce" and plan.schema is not None:
            body["response_format"] = _engine_format(fmt if source == "request" else None, plan.schema, source, layout)
        return plan

    def check(self) -> JsonCheck | None:
        if self.mode == "off" or self.schema is None:
            return None
        return JsonCheck(self.schema, self.mode, unenforced=self.unenforced)

    def validate_instead(self, body: dict[str, Any], keywords: tuple[str, ...]) -> JsonPlan:
        """The plan when the engine cannot enforce the schema: no constraint sent, the answer checked as usual."""
        body.pop("response_format", None)
        return replace(self, mode="validate", unenforced=keywords)


def _engine_format(
    fmt: dict[str, Any] | None, schema: dict[str, Any], source: str, layout: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``response_format`` the engine gets: the client's own ``fmt`` where no layout is added to it."""
    if fmt is not None and layout is None and "x-guidance" not in schema:
        return fmt  # as the client wrote it (json_object stays json_object)
    if fmt is not None and fmt.get("type") == "json_object":
        return {
            "type": "json_schema",
            "json_schema": {"name": "json_object", "schema": laid_out({"type": "object"}, layout)},
        }
    if fmt is not None:
        return {**fmt, "json_schema": {**fmt["json_schema"], "schema": laid_out(schema, layout)}}
    return {"type": "json_schema", "json_schema": {"name": source, "schema": laid_out(schema, layout)}}


@dataclass
class JsonCheck:
    schema: dict[str, Any]
    mode: JsonMode = "validate"
    unenforced: tuple[str, ...] = ()
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return self.checks[0]["outcome"] if self.checks else "none"

    def judge_all(self, answers: list[tuple[int, str, str | None]]) -> list[dict[str, Any]]:
        self.checks = []
        for index, text, finish_reason in answers:
            verdict = judge(text, self.schema, finish_reason=finish_reason)
            self.checks.append(
                {
                    "index": index,
                    "valid": verdict.outcome == "valid",
                    "outcome": verdict.outcome,
                    "errors": verdict.errors,
                }
            )
        return self.checks

    def add_to(self, data: dict[str, Any]) -> None:
        """A whole (non-streamed) response with the verdicts added."""
        answers = [
            (
                c.get("index", 0),
                _text(c.get("message", {}).get("content") if "message" in c else c.get("text")),
                c.get("finish_reason"),
            )
            for c in data.get("choices", [])
        ]
        data["lorafleet"] = self._verdict(self.judge_all(answers))

    def observe(self, data: dict[str, Any]) -> None:
        """Collect one server-sent event's text deltas (its payload, ``serving.http.sse.event_data``)."""
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
        event = {"object": "lorafleet.json_check", "choices": [], "lorafleet": self._verdict(checks)}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def _verdict(self, checks: list[dict[str, Any]]) -> dict[str, Any]:
        verdict: dict[str, Any] = {"json_checks": checks, "outcome": self.outcome, "mode": self.mode}
        if self.unenforced:
            verdict["unenforced_keywords"] = list(self.unenforced)
        return verdict


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
