"""Function calling as a JSON task: the call schema of a function spec, and how tools enter the prompt.

A call is the JSON object ``{"name": <function>, "arguments": {...}}``. Its
schema follows from the function's spec: ``name`` is a constant and
``arguments`` is the spec's ``parameters`` (with the non-JSON-Schema type names
some datasets use, such as BFCL's ``"dict"``, mapped to JSON Schema's). The
gateway uses the same schema to constrain and check a call at serving time.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_FORMAT = "lorafleet-tools-v1"

# Keys of an OpenAI function definition the training format carries ("strict" is OpenAI's own switch).
FUNCTION_KEYS = ("name", "description", "parameters")

# Type names seen in function-calling datasets that JSON Schema spells differently.
_TYPE_ALIASES = {
    "dict": "object",
    "float": "number",
    "int": "integer",
    "tuple": "array",
    "list": "array",
    "str": "string",
    "bool": "boolean",
}


def json_schema_of(parameters: Any) -> Any:
    """``parameters`` with dataset type names (``dict``, ``float``, ``tuple``, ``any``…) made JSON Schema."""
    if isinstance(parameters, list):
        return [json_schema_of(p) for p in parameters]
    if not isinstance(parameters, dict):
        return parameters
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        if key == "type" and isinstance(value, str):
            if value == "any":
                continue  # no constraint
            out[key] = _TYPE_ALIASES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: json_schema_of(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"):
            out[key] = json_schema_of(value)
        else:
            out[key] = value
    return out


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a call to ``function`` (``{"name", "description"?, "parameters"}``)."""
    parameters = json_schema_of(function.get("parameters") or {"type": "object", "properties": {}})
    parameters.setdefault("type", "object")
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def any_call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """A call to any one of ``functions``."""
    schemas = [call_schema(f) for f in functions]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


# How the system text of ``lorafleet-tools-v1`` begins: what to answer, before the functions are listed.
TOOLS_INSTRUCTION = (
    "You can call the functions below. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": {<argument>: <value>, ...}}.\n\nFunctions:\n'
)


def tools_system_prompt(functions: list[dict[str, Any]]) -> str:
    """The system text that presents ``functions`` to the model (format ``lorafleet-tools-v1``)."""
    return TOOLS_INSTRUCTION + "\n".join(json.dumps(f, ensure_ascii=False, sort_keys=True) for f in functions)


def function_of(spec: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``function`` definition as the prompt presents it: its name, description and parameters (an
    empty object schema when it has none)."""
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    return {k: spec[k] for k in FUNCTION_KEYS if k in spec} | {"parameters": parameters}


def call_text(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant turn's OpenAI ``tool_calls`` written the way an adapter answers: the first call as
    ``{"name", "arguments"}`` (the gateway reads earlier calls in a conversation back the same way)."""
    fn = (tool_calls[0] or {}).get("function") or {}
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = {}
    return json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False)
