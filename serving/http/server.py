"""How the gateway is served: uvicorn, with a deadline on each request's headers.

uvicorn bounds how long a connection may idle between requests (its
keep-alive timeout) but not how long a client may take to send a request's
headers, nor how long it may stay connected without sending anything: a few
hundred such connections (slowloris) hold the gateway's file descriptors and
memory with no key. ``header_deadline`` is uvicorn's own HTTP protocol with one
timer added: armed when a connection opens and when a request's first byte
arrives, disarmed when its headers are complete; if it fires, the connection
is closed. The body's own limits (size and time) are ``serving.http.middleware``'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers take over ``header_timeout_s``."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            # A request is being served and uvicorn reads no further until it is answered (a pipelined one waits
            # in its buffer): not the client's slowness. The clock starts again.
            self._arm()
            return
        self.transport.close()


def header_deadline(timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class for ``uvicorn.run(http=...)`` with this deadline on a request's headers."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": timeout_s})
