"""OpenAI function calling (``tools``, ``tool_choice``, ``tool_calls``) for adapters trained on calls.

The request's tools are rendered into the prompt exactly as training rendered
them (``contract.prompt.with_tools``, format ``lorafleet-tools-v1``, recorded in
the adapter manifest), so a client using the SDK's standard tools API gets the
fine-tuned behaviour without knowing the prompt format. The answer, a JSON
object ``{"name", "arguments"}``, goes back as OpenAI ``tool_calls`` with
``finish_reason: "tool_calls"``; an answer that is not a call to one of the
tools stays plain content. The call schema (``contract.tools.call_schema``) is
what the gateway enforces and checks, like any other schema.

Streams: whether an answer is a call is known only once it is complete, so a
choice's text is held back and sent as one ``tool_calls`` delta (or one
content delta) when that choice finishes; other events pass through.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from contract.prompt import with_tools
from contract.tools import TOOLS_FORMAT, any_call_schema, call_schema, call_text, function_of, json_schema_of
from serving.errors import APIError, ErrorCode
from serving.outputs.schemas import check_client_schema


def _bad(message: str, param: str) -> APIError:
    return APIError(ErrorCode.INVALID_TOOLS, message, param=param)


@dataclass
class ToolPlan:
    functions: list[dict[str, Any]]
    chosen: str | None = None  # tool_choice naming one function

    @property
    def schema(self) -> dict[str, Any]:
        if self.chosen is not None:
            return call_schema(next(f for f in self.functions if f["name"] == self.chosen))
        return any_call_schema(self.functions)

    @classmethod
    def from_request(cls, body: dict[str, Any], tools_format: str | None, alias: str) -> ToolPlan | None:
        """Take ``tools``/``tool_choice`` out of ``body`` and render them into its messages.

        ``None`` when the request has no tools or ``tool_choice`` is ``"none"``
        (the tools are then left out of the prompt). ``tools_format``: the one the
        adapter was trained with (its manifest's ``prompt_format.tools_format``).
        """
        tools = body.pop("tools", None)
        choice = body.pop("tool_choice", None)
        body.pop("parallel_tool_calls", None)  # one call per answer: that is what the adapters learn
        if tools is None:
            if choice not in (None, "none"):
                raise _bad("'tool_choice' needs 'tools'.", "tool_choice")
            return None
        functions = _functions(tools)
        chosen = _chosen(choice, {f["name"] for f in functions})
        if choice == "none":
            return None
        if tools_format != TOOLS_FORMAT:
            raise APIError(
                ErrorCode.TOOLS_UNSUPPORTED,
                f"The model '{alias}' was not trained for function calling; send no 'tools'.",
                param="tools",
            )
        body["messages"] = with_tools(_flatten_history(body["messages"]), functions)
        return cls(functions, chosen)

    def as_tool_call(self, text: str) -> dict[str, Any] | None:
        """``text`` as an OpenAI tool call, when it is a call to one of the tools."""
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not (isinstance(parsed, dict) and isinstance(parsed.get("arguments"), dict)):
            return None
        if parsed.get("name") not in {f["name"] for f in self.functions}:
            return None
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": parsed["name"], "arguments": json.dumps(parsed["arguments"], ensure_ascii=False)},
        }

    def rewrite_body(self, data: dict[str, Any]) -> None:
        """A whole chat completion with each call answer turned into ``tool_calls``."""
        for c in data.get("choices") or []:
            message = c.get("message") or {}
            call = self.as_tool_call(message.get("content") or "")
            if call is not None:
                message["content"] = None
                message["tool_calls"] = [call]
                c["finish_reason"] = "tool_calls"


def check_tools(tools: Any) -> None:
    """Each tool's parameters, and the call schema of them all (what the engine is constrained with), within the
    limits of a client schema (``serving.outputs.schemas``). Run off the event loop (``schemas.bounded``)."""
    functions = _functions(tools, check=True)
    try:
        combined = any_call_schema(functions)
    except RecursionError as exc:
        raise _bad("tools: the parameters nest too deeply.", "tools") from exc
    check_client_schema(combined, param="tools")


def _functions(tools: Any, check: bool = False) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise _bad('\'tools\' must be a non-empty list of {"type": "function", "function": {...}}.', "tools")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _bad(f'{where}: give {{"type": "function", "function": {{"name", ...}}}}.', where)
        spec = tool["function"]
        name = spec.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise _bad(f"{where}.function.name: a name of 1-64 characters is required.", f"{where}.function.name")
        if name in names:
            raise _bad(f"{where}.function.name: {name!r} is given twice.", f"{where}.function.name")
        names.add(name)
        parameters = spec.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(f"{where}.function.parameters: must be a JSON Schema object.", f"{where}.function.parameters")
        if check:
            try:
                schema = json_schema_of(parameters)
            except RecursionError as exc:
                raise _bad(f"{where}.function.parameters: nested too deeply.", f"{where}.function.parameters") from exc
            check_client_schema(schema, param=f"{where}.function.parameters")
        functions.append(function_of(spec))
    return functions


def _chosen(choice: Any, names: set[str]) -> str | None:
    if choice in (None, "auto", "required", "none"):
        return None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in names:
            return str(name)
        raise _bad(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
    raise _bad(
        'tool_choice: use "auto", "required", "none" or {"type": "function", "function": {"name"}}.', "tool_choice"
    )


def _flatten_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls in the conversation written the way the adapter writes them; text parts joined."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        calls = m.pop("tool_calls", None)
        if m.get("role") == "assistant" and calls:
            m["content"] = call_text(calls)
        m.pop("tool_call_id", None)
        m.setdefault("content", "")
        if m["content"] is None:
            m["content"] = ""
        out.append(m)
    return out


@dataclass
class ToolStream:
    """Rewrites a chat stream's events: each choice's text held back and sent whole when it finishes."""

    plan: ToolPlan
    texts: dict[int, list[str]] = field(default_factory=dict)

    def on_event(self, event: bytes, data: dict[str, Any] | None) -> list[bytes]:
        """The events to send for ``event`` (``data``: its payload, ``serving.http.sse.event_data``)."""
        if data is None:
            return [event]
        choices = data.get("choices") or []
        if not choices:
            return [event]  # the usage chunk
        out = []
        for c in choices:
            index = c.get("index", 0)
            delta = c.get("delta") or {}
            self.texts.setdefault(index, []).append(delta.pop("content", None) or "")
            finish = c.get("finish_reason")
            if delta:  # the role, first
                out.append(_chunk(data, index, delta, None))
            if finish:
                out.extend(self._finish(data, index, finish))
        return out

    def _finish(self, data: dict[str, Any], index: int, finish: str) -> list[bytes]:
        text = "".join(self.texts.pop(index, []))
        call = self.plan.as_tool_call(text)
        if call is None:
            return [_chunk(data, index, {"content": text}, finish)]
        return [
            _chunk(data, index, {"tool_calls": [{"index": 0, **call}]}, None),
            _chunk(data, index, {}, "tool_calls"),
        ]


def _chunk(template: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None) -> bytes:
    chunk: dict[str, Any] = {k: template[k] for k in ("id", "object", "created", "model") if k in template}
    chunk["choices"] = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
