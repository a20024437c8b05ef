"""The outermost middleware: a request id, a ``RequestRecord``, metrics and one JSON access-log line per request.

The request id is the client's ``X-Request-ID`` when it is a sane token (else a
new one); it is returned in the response header and passed to vLLM. The
access log (logger ``lorafleet.access``) holds no prompt, output or key:
``LORAFLEET_LOG_CONTENT=1`` is the explicit switch that adds the request and
response bodies of completion routes, for debugging only.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import GatewayMetrics
from serving.records import RequestRecord

access_log = logging.getLogger("lorafleet.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CONTENT_LIMIT = 64 * 1024  # per body, with content logging on


def record_of(scope: Scope) -> RequestRecord | None:
    record = scope.get("state", {}).get("record")
    return record if isinstance(record, RequestRecord) else None


class Observe:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, log_content: bool = False) -> None:
        self.app, self.metrics, self.log_content = app, metrics, log_content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        record = RequestRecord(rid, scope["method"], scope["path"])
        scope.setdefault("state", {})["record"] = record
        content: dict[str, list[bytes]] = {"request": [], "response": []}
        # Request and response bodies (debugging only), never a file's: it may be hundreds of MiB of training data.
        capture = self.log_content and scope["path"].startswith("/v1/") and not scope["path"].startswith("/v1/files")

        async def receive_wrapper() -> Message:
            message = await receive()
            if capture and message["type"] == "http.request":
                content["request"].append(message.get("body", b""))
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif capture and message["type"] == "http.response.body":
                content["response"].append(message.get("body", b""))
            await send(message)
            if record.first_sent is None and message["type"] == "http.response.body" and message.get("body"):
                record.first_sent = time.perf_counter()

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_wrapper if capture else receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            record.finished = record.finished or time.perf_counter()
            route = scope.get("route")
            record.route = getattr(route, "path", None) or "unmatched"
            if record.status == 413 and record.rejection is None:
                record.rejection = "too_large"  # refused by the body limit, before any route
            for callback in record.on_end:
                callback(record)
            self.metrics.observe(record)
            entry = record.log_entry()
            if capture:
                entry |= {k: b"".join(v)[:CONTENT_LIMIT].decode("utf-8", "replace") for k, v in content.items()}
            access_log.info(json.dumps(entry, ensure_ascii=False))
