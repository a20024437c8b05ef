"""JSON modes: what the gateway does with a request's schema, and the per-alias policy an admin sets.

- ``enforce``: constrained decoding in vLLM (structured outputs), and the answer is checked after;
- ``validate``: free generation, the answer checked after;
- ``off``: neither.

Plain values, importing nothing: the request models (``serving.http.protocol``),
the JSON plan (``serving.outputs.jsoncheck``) and the policies' store
(``serving.state.policies``) all name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

JsonMode = Literal["enforce", "validate", "off"]
JSON_MODES: tuple[str, ...] = get_args(JsonMode)


@dataclass(frozen=True)
class AliasPolicy:
    json_mode: JsonMode | None = None
    default_schema: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"json_mode": self.json_mode, "default_schema": self.default_schema}
