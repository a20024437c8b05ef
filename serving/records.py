"""The record each request leaves behind: filled in as the request goes, observed once it ends.

``serving.http.observe`` creates one per request and the routes fill it in; when
the response ends, ``serving.metrics.GatewayMetrics.observe`` turns it into
metrics, the access log into one JSON line, and a canary (``serving.canary``)
into a sample of its variant. It is plain data, importing nothing of the
gateway, so each of those can read it without importing the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What one request did; filled in as it goes, observed once it ends."""

    request_id: str  # the client's X-Request-ID (when sane) or one made here: in the log and the response header
    method: str
    path: str
    engine_request_id: str | None = None  # the gateway's own id for the engine (unique per request)
    started: float = field(default_factory=time.perf_counter)
    route: str = "unmatched"
    status: int = 0
    tenant: str | None = None
    alias: str | None = None
    version: int | None = None
    variant: str | None = None
    stream: bool = False
    upstream_at: float | None = None  # when the gateway handed the request to its engine client
    upstream_sent: float | None = None  # when that client had written it to the engine's connection
    first_token: float | None = None  # the engine's first event reached the gateway
    first_sent: float | None = None  # the first body bytes were handed to the client's connection
    finished: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    client_max_tokens: bool = False  # the client set max_tokens itself (an answer cut there is its choice)
    json_mode: str | None = None
    # The answer was checked against the alias's own schema in the alias's own mode, not one the client chose:
    # only such verdicts judge a canary (a tenant cannot steer one with schemas of its own).
    json_judged: bool = False
    json_outcomes: list[str] = field(default_factory=list)
    rejection: str | None = None
    error_code: str | None = None
    on_end: list[Callable[[RequestRecord], None]] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def engine_ttft(self) -> float | None:
        """From the request written to the engine to its first event arriving (streams): the engine's share."""
        sent = self.upstream_sent or self.upstream_at
        if self.first_token is None or sent is None:
            return None
        return round(self.first_token - sent, 6)

    def mark_sent(self) -> None:
        self.upstream_sent = time.perf_counter()

    @property
    def relay_first(self) -> float | None:
        """From the engine's first event reaching the gateway to the client's connection taking it (streams)."""
        if self.first_token is None or self.first_sent is None:
            return None
        return round(self.first_sent - self.first_token, 6)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (streams only)."""
        if self.first_token is None or self.finished is None or not self.completion_tokens:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.completion_tokens - 1)

    def usage(self, usage: dict | None) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)

    def log_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "request_id": self.request_id,
            "engine_request_id": self.engine_request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "latency_s": round(self.latency, 4),
            "tenant": self.tenant,
            "alias": self.alias,
            "version": self.version,
            "variant": self.variant,
            "stream": self.stream,
            "ttft_s": None if self.ttft is None else round(self.ttft, 4),
            "gateway_s": None if self.upstream_at is None else round(self.upstream_at - self.started, 6),
            "upstream_send_s": None
            if self.upstream_sent is None or self.upstream_at is None
            else round(self.upstream_sent - self.upstream_at, 6),
            "engine_ttft_s": self.engine_ttft,
            "relay_first_s": self.relay_first,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "json_mode": self.json_mode,
            "json_outcome": self.json_outcomes[0] if self.json_outcomes else None,
        }
        if self.rejection:
            entry |= {"rejection": self.rejection, "error_code": self.error_code}
        return entry
