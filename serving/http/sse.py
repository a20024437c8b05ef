"""Server-sent events from the engine: the one place an event's JSON payload is read."""

from __future__ import annotations

import json
from typing import Any


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a ``data:`` event; ``None`` for ``[DONE]``, other lines, or a payload that is not one."""
    line = event.strip()
    if not line.startswith(b"data:") or line == b"data: [DONE]":
        return None
    try:
        data = json.loads(line[5:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
