"""Per-tenant request limits, enforced in the gateway process before a request reaches the engine.

- requests per minute: a token bucket per tenant (capacity = the limit, refilled
  continuously), so a burst up to the limit passes and a steady overload gets
  429 with the seconds until the next request would pass as ``Retry-After``;
- concurrent requests: a counter per tenant, held for the whole request
  (a stream holds it until its last byte);
- max tokens per request: a request asking for more is refused (400: a retry
  would not help); one asking for nothing gets the tenant's limit.

State is in memory: limits are per gateway replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.errors import APIError
from serving.tenants import Tenant


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class TenantLimiter:
    clock: object = time.monotonic
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    _in_flight: dict[int, int] = field(default_factory=dict)

    def admit(self, tenant: Tenant) -> Slot:
        """Take one request slot for ``tenant`` or raise 429; release the slot when the request ends."""
        limits = tenant.limits
        now = self.clock()  # type: ignore[operator]
        if limits.requests_per_minute:
            rate = limits.requests_per_minute / 60.0
            bucket = self._buckets.get(tenant.id) or _Bucket(float(limits.requests_per_minute), now)
            bucket.tokens = min(float(limits.requests_per_minute), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            self._buckets[tenant.id] = bucket
            if bucket.tokens < 1.0:
                wait = math.ceil((1.0 - bucket.tokens) / rate)
                raise APIError(429, f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)})  # fmt: skip
        in_flight = self._in_flight.get(tenant.id, 0)
        if limits.max_concurrent and in_flight >= limits.max_concurrent:
            raise APIError(429, f"Too many concurrent requests: the limit is {limits.max_concurrent}.",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        if limits.requests_per_minute:
            self._buckets[tenant.id].tokens -= 1.0
        self._in_flight[tenant.id] = in_flight + 1
        return Slot(self, tenant.id)

    def _release(self, tenant_id: int) -> None:
        self._in_flight[tenant_id] = max(0, self._in_flight.get(tenant_id, 1) - 1)

    def in_flight(self, tenant: Tenant) -> int:
        return self._in_flight.get(tenant.id, 0)


class Slot:
    """One admitted request; ``release`` (idempotent) frees it and runs what was registered with ``on_release``."""

    def __init__(self, limiter: TenantLimiter, tenant_id: int) -> None:
        self._limiter, self._tenant_id, self._held = limiter, tenant_id, True
        self._callbacks: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release(self._tenant_id)
            for callback in self._callbacks:
                callback()


def cap_max_tokens(body: dict, tenant: Tenant) -> None:
    """Refuse a request asking for more tokens than the tenant may; fill in the limit when it asks for none."""
    limit = tenant.limits.max_tokens
    if limit is None:
        return
    for name in ("max_tokens", "max_completion_tokens"):
        asked = body.get(name)
        if isinstance(asked, int) and asked > limit:
            raise APIError(400, f"'{name}' is {asked}; this key may ask for at most {limit}.", param=name,
                           code="max_tokens_over_limit")  # fmt: skip
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = limit
