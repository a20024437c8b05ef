"""ASGI middleware that must see the raw request before FastAPI does: how big a body may be, and how long it
may take to arrive.

A request body is read here, up to ``max_bytes`` and within ``timeout_s``, and handed on whole: counting it
while the app reads would surface as the app's own parse error (400), not as 413. The upload routes (an
adapter archive, a tenant's file) are the exception: their bodies (up to their own limits) are never held
here; they pass through, counted and timed as they go, so the route's key check runs before a byte of them is
read and the route streams them to disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import APIError, ErrorCode, error_body


class BodySizeLimit:
    """413 for a body over its limit (by its Content-Length up front, or counted as it comes); 408 for one that
    takes longer than its time to arrive."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        uploads: list[tuple[str, int]] | None = None,
        timeout_s: float = 30.0,
        upload_timeout_s: float = 600.0,
    ) -> None:
        self.app, self.max_bytes, self.timeout_s, self.upload_timeout_s = app, max_bytes, timeout_s, upload_timeout_s
        self.uploads = [(re.compile(path), limit) for path, limit in uploads or []]  # (path pattern, its limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload_limit = next((limit for path, limit in self.uploads if path.fullmatch(scope["path"])), None)
        upload = upload_limit is not None
        limit = upload_limit if upload_limit is not None else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _refuse(send, 413, _too_large(limit), ErrorCode.BODY_TOO_LARGE)
            return
        if upload:
            metered = _Metered(receive, limit, self.upload_timeout_s)
            await self.app(scope, metered, _closing_unless(lambda: metered.done, send))
            return
        first = await self._read_whole(receive, send, limit)
        if first is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()  # later messages (a disconnect while a stream is relayed) pass through

        await self.app(scope, replay, send)

    async def _read_whole(self, receive: Receive, send: Send, limit: int) -> Message | None:
        """The body as one message; ``None`` when it was refused here (413, 408)."""
        chunks: list[bytes] = []
        seen = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await _refuse(send, 408, _too_slow(self.timeout_s), ErrorCode.REQUEST_TIMEOUT)
                return None
            if message["type"] != "http.request":  # the client left before the body ended
                return message
            body = message.get("body", b"")
            seen += len(body)
            if seen > limit:
                await _refuse(send, 413, _too_large(limit), ErrorCode.BODY_TOO_LARGE)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


class _Metered:
    """A ``receive`` that counts the body against ``limit`` and gives it ``timeout_s`` in all to arrive: past
    either, the read raises an ``APIError`` (413, 408) that the route's error handler answers."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self.receive, self.limit, self.timeout_s = receive, limit, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.seen = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:  # the body is in: what comes now (a disconnect) has no deadline
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise APIError(ErrorCode.REQUEST_TIMEOUT, _too_slow(self.timeout_s)) from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise APIError(ErrorCode.BODY_TOO_LARGE, _too_large(self.limit))
            self.done = not message.get("more_body", False)
        return message


def _closing_unless(body_read: Callable[[], bool], send: Send) -> Send:
    """``send``, closing the connection after a response that starts before the request's body was read to its
    end (a refusal: the admin key, the content type, the size, the time)."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start" and not body_read():
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


def _too_large(limit: int) -> str:
    return f"Request body too large: the limit is {limit} bytes."


def _too_slow(timeout_s: float) -> str:
    return f"The request body took longer than {timeout_s:g} s to arrive; send it again, faster."


async def _refuse(send: Send, status: int, message: str, code: ErrorCode) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    # The body was not read to its end: the connection closes with this answer, or a client could keep it open
    # forever sending the rest a byte at a time.
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
