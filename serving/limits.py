"""Per-tenant request limits, enforced in the gateway process before a request reaches the engine.

Both counting limits count *sequences*, the unit of work the engine schedules:
a request for ``n`` answers to each of ``p`` prompts is ``n × p`` of them.

- requests per minute: a token bucket per tenant (capacity = the limit, refilled
  continuously), so a burst up to the limit passes and a steady overload gets
  429 with the seconds until the next request would pass as ``Retry-After``;
- concurrent requests: a counter per tenant, held for the whole request
  (a stream holds it until its last byte);
- max tokens per request: the budget of the whole request, every sequence
  together (``n × prompts × max_tokens``); a request asking for more is refused
  (400: a retry would not help); one asking for nothing gets the budget shared
  among its sequences.

A request costing more than a limit allows at all is refused with 400, not 429.

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

    def admit(self, tenant: Tenant, cost: int = 1) -> Slot:
        """Take ``cost`` sequences' slots for ``tenant`` or raise 429; release the slot when the request ends."""
        limits = tenant.limits
        for limit, what in ((limits.requests_per_minute, "requests per minute"),
                            (limits.max_concurrent, "concurrent requests")):  # fmt: skip
            if limit and cost > limit:
                raise APIError(400, f"This request is {cost} sequences (n × prompts); this key's limit is {limit} "
                               f"{what}. Send fewer prompts or a smaller n.", param="n",
                               code="sequences_over_limit")  # fmt: skip
        now = self.clock()  # type: ignore[operator]
        if limits.requests_per_minute:
            rate = limits.requests_per_minute / 60.0
            bucket = self._buckets.get(tenant.id) or _Bucket(float(limits.requests_per_minute), now)
            bucket.tokens = min(float(limits.requests_per_minute), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            self._buckets[tenant.id] = bucket
            if bucket.tokens < cost:
                wait = math.ceil((cost - bucket.tokens) / rate)
                raise APIError(429, f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)})  # fmt: skip
        in_flight = self._in_flight.get(tenant.id, 0)
        if limits.max_concurrent and in_flight + cost > limits.max_concurrent:
            raise APIError(429, f"Too many concurrent requests: the limit is {limits.max_concurrent}.",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        if limits.requests_per_minute:
            self._buckets[tenant.id].tokens -= cost
        self._in_flight[tenant.id] = in_flight + cost
        return Slot(self, tenant.id, cost)

    def _release(self, tenant_id: int, cost: int) -> None:
        self._in_flight[tenant_id] = max(0, self._in_flight.get(tenant_id, cost) - cost)

    def in_flight(self, tenant: Tenant) -> int:
        return self._in_flight.get(tenant.id, 0)


class Slot:
    """One admitted request; ``release`` (idempotent) frees it and runs what was registered with ``on_release``."""

    def __init__(self, limiter: TenantLimiter, tenant_id: int, cost: int = 1) -> None:
        self._limiter, self._tenant_id, self._cost, self._held = limiter, tenant_id, cost, True
        self._callbacks: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release(self._tenant_id, self._cost)
            for callback in self._callbacks:
                callback()


def cap_max_tokens(body: dict, tenant: Tenant, sequences: int = 1) -> None:
    """Refuse a request whose sequences together may make more tokens than the tenant's budget per request.

    A request asking for no ``max_tokens`` gets the budget shared among its sequences.
    """
    limit = tenant.limits.max_tokens
    if limit is None:
        return
    for name in ("max_completion_tokens", "max_tokens"):
        asked = body.get(name)
        if isinstance(asked, int) and asked * sequences > limit:
            spread = f" × {sequences} sequences (n × prompts) = {asked * sequences}" if sequences > 1 else ""
            raise APIError(400, f"'{name}' is {asked}{spread}; this key may ask for at most {limit} tokens per "
                           "request.", param=name, code="max_tokens_over_limit")  # fmt: skip
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        if limit // sequences < 1:
            raise APIError(400, f"{sequences} sequences (n × prompts) cannot share this key's budget of {limit} "
                           "tokens per request.", param="n", code="max_tokens_over_limit")  # fmt: skip
        body["max_tokens"] = limit // sequences
