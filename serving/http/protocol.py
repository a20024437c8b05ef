"""What crosses the wire between a client and the engine, both ways, as allowlists.

Requests: every field a client may send is typed here, with OpenAI's bounds.
A field that is not listed is refused with 400 ``unsupported_parameter``
(``serving.errors``), naming it and, where there is one, what to use instead:
vLLM's own request extras (``structured_outputs``, ``guided_json``,
``vllm_xargs``, ``kv_transfer_params``, ``priority``, ...) would bypass the
gateway's schema limits, its JSON check, or another tenant's share of the
engine. The engine gets only what these models dump, plus what the gateway
itself sets (the adapter, its chat template, the cache salt, the JSON
constraint it built).

Besides OpenAI's parameters, a few vLLM sampling extras are accepted because
they only shape the sampling of the caller's own sequences and cost nothing
extra per token: ``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``min_tokens`` and ``ignore_eos`` (both bounded by
``max_tokens``, itself within the tenant's budget).

Responses: ``filter_response`` / ``filter_chunk`` keep OpenAI's fields (and
the gateway's own ``lorafleet`` object) and drop the engine's internals:
``system_fingerprint`` (it names the engine version), ``prompt_token_ids``,
``token_ids``, ``stop_reason``, ``kv_transfer_params``, ``routed_experts``,
``metrics``, ...
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.outputs.modes import JsonMode

# What to use instead of a refused field, when there is something.
INSTEAD = {
    "structured_outputs": "use 'response_format' (json_schema or json_object)",
    "guided_json": 'use \'response_format\': {"type": "json_schema", ...}',
    "guided_regex": "use 'response_format' with a JSON Schema",
    "guided_grammar": "use 'response_format' with a JSON Schema",
    "guided_choice": "use 'response_format' with a JSON Schema whose 'enum' lists the choices",
    "guided_decoding_backend": "the gateway chooses the backend",
    "functions": "use 'tools'",
    "function_call": "use 'tool_choice'",
    "best_of": "use 'n'",
    "chat_template": "the gateway renders each adapter's own template",
    "chat_template_kwargs": "the gateway renders each adapter's own template",
    "lora_request": "name the alias in 'model'",
    "lora_path": "name the alias in 'model'",
    "cache_salt": "the gateway sets it per tenant",
    "priority": "every tenant's requests are scheduled alike",
    "tools": "function calling is on /v1/chat/completions",
    "tool_choice": "function calling is on /v1/chat/completions",
    "messages": "chat messages go to /v1/chat/completions",
    "prompt": "a prompt goes to /v1/completions; chat takes 'messages'",
    "image_url": "the models served read text only: send the content as text parts",
    "input_audio": "the models served read text only: send the content as text parts",
    "file": "the models served read text only: send the content as text parts",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewayOptions(_Strict):
    """The request's own ``lorafleet`` object (``extra_body`` in the openai client); never sent to vLLM."""

    json_mode: JsonMode | None = Field(default=None, description="enforce, validate or off, for this request.")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str = Field(max_length=256)
    arguments: str


class MessageToolCall(_Strict):
    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)


_FORMAT_KEYS = {"type", "json_schema"}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


class RequestBase(_Strict):
    """The fields both completion routes accept."""

    model: str | None = Field(
        default=None, max_length=128, description="The alias; empty means the tenant's default alias."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 30)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # the engine's is a 64-bit integer
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, max_length=256)
    response_format: dict[str, Any] | None = None
    # vLLM sampling extras: each shapes only this request's own sequences.
    top_k: int | None = Field(default=None, ge=-1, le=1 << 20)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=16)
    min_tokens: int | None = Field(default=None, ge=0, le=1 << 20)
    ignore_eos: bool | None = None
    lorafleet: GatewayOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 8 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 8 stop sequences of up to 256 characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or len(token) > 10 or int(token) >= 2**31 or not -100 <= bias <= 100:
                raise ValueError("token ids (as strings) mapped to a bias from -100 to 100")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema") or not set(value) <= _FORMAT_KEYS:
            raise ValueError('give {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}')
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not set(spec) <= _JSON_SCHEMA_KEYS or "schema" not in spec:
                raise ValueError('json_schema takes {"name", "schema", "description", "strict"}, "schema" required')
        elif "json_schema" in value:
            raise ValueError(f"'json_schema' goes with type json_schema, not {kind}")
        return value


class ChatRequest(RequestBase):
    messages: list[Message] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 30)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TextRequest(RequestBase):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None

    @property
    def prompts(self) -> int:
        return 1 if isinstance(self.prompt, str) else len(self.prompt)


def unsupported_message(field: str) -> str:
    name = field.rsplit(".", 1)[-1]
    instead = INSTEAD.get(name)
    hint = f": {instead}" if instead else ""
    return f"'{field}' is not a supported parameter{hint}. The accepted fields are listed in docs/api.md."


# Responses: the OpenAI fields at each level; everything else the engine adds is dropped.
_TOP = ("id", "object", "created", "model", "choices", "usage", "lorafleet")
_CHOICE = ("index", "message", "delta", "text", "logprobs", "finish_reason")
_MESSAGE = ("role", "content", "tool_calls", "refusal")
_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")


def _pick(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: data[k] for k in keys if k in data}


def filter_response(data: dict[str, Any]) -> dict[str, Any]:
    """A whole completion, or one stream chunk, with only OpenAI's fields (and ``lorafleet``)."""
    out = _pick(data, _TOP)
    choices = []
    for choice in out.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        kept = _pick(choice, _CHOICE)
        for part in ("message", "delta"):
            if isinstance(kept.get(part), dict):
                kept[part] = _pick(kept[part], _MESSAGE)
        choices.append(kept)
    if "choices" in out:
        out["choices"] = choices
    if isinstance(out.get("usage"), dict):
        out["usage"] = _pick(out["usage"], _USAGE)
    return out


def cursor_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page (files, checkpoints): the items, whether more follow, and the first and last ids."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
