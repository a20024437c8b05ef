"""ASGI middleware that must see the raw request before FastAPI does."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import ErrorCode, error_body


class BodySizeLimit:
    """413 for a body over ``max_bytes``: by its Content-Length up front, or by counting a chunked body as it comes."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: tuple[str, int] | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.uploads = (re.compile(uploads[0]), uploads[1]) if uploads else None  # (path pattern, its limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if self.uploads and self.uploads[0].fullmatch(scope["path"]):
            limit = self.uploads[1]
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(send, limit)
            return
        # A body without a length (chunked) is read here, up to the limit, and handed on whole: counting it
        # while the app reads would surface as the app's own parse error (400), not as 413.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                chunks = []
                first: Message = message
                break
            body = message.get("body", b"")
            seen += len(body)
            if seen > limit:
                await self._refuse(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()  # later messages (a disconnect while a stream is relayed) pass through

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        message = f"Request body too large: the limit is {limit} bytes."
        body = json.dumps(error_body(413, message, ErrorCode.BODY_TOO_LARGE)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
