"""What the gateway needs from an inference engine, and nothing of how it is reached.

The gateway talks to an ``Engine``: load and unload adapters, forward an
OpenAI request, say whether it is ready. ``serving.engines.vllm.VLLMEngine`` is
the real one; the tests' fake engine implements the same protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

# The engine-side name of the bare base model (an adapter's is its ``alias@version``).
BASE_MODEL_NAME = "base"


class EngineError(RuntimeError):
    """The engine refused an operation or could not be reached."""


class EngineTimeout(EngineError):
    """The engine took too long: to take the connection, or, once the request was written, to answer it."""


class EngineResponse(Protocol):
    """The engine's answer to ``Engine.send``, read as it arrives; the caller closes it.

    ``httpx.Response`` has this shape too (the tests' fake engine returns one).
    """

    status_code: int

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    """What the gateway needs from an inference engine."""

    restarts: int

    def is_ready(self) -> bool: ...

    async def start(self, on_ready: Callable[[], Awaitable[None]]) -> None: ...

    async def stop(self) -> None: ...

    async def load_adapter(self, name: str, path: Path) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def send(
        self,
        path: str,
        body: dict,
        *,
        stream: bool,
        request_id: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> EngineResponse:
        """POST ``body`` to the engine's OpenAI route ``path``; the caller closes the response.

        ``on_sent`` is called once the request is written to the engine's connection.
        """
        ...

    async def metrics(self) -> bytes:
        """The engine's own Prometheus exposition."""
        ...

    async def adapters(self) -> list[str]:
        """The adapters the engine itself says it holds (its ``/v1/models``, the base model left out)."""
        ...

    async def base_root(self) -> str | None:
        """Where the engine loaded its base model from (the ``root`` of ``base`` in its ``/v1/models``)."""
        ...
