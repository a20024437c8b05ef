"""Per-tenant request limits, enforced in the gateway process before a request reaches the engine.

Both counting limits count *sequences*, the unit of work the engine schedules:
a request for ``n`` answers to each of ``p`` prompts is ``n × p`` of them.

- requests per minute: a token bucket per tenant (capacity = the limit, refilled
  continuously), so a burst up to the limit passes and a steady overload gets
  429 with the seconds until the next request would pass as ``Retry-After``;
- concurrent requests: a counter per tenant, held for the whole request
  (a stream holds it until its last byte);
- tokens per minute: a token bucket of prompt + completion tokens, charged
  with what each request really used when it ends (the engine's usage); a
  request is admitted while the bucket is above zero, so one request may
  overdraw it, and the next waits until it has refilled (429, ``Retry-After``);
- max tokens per request: the budget of the whole request, every sequence
  together (``n × prompts × max_tokens``); a request asking for more is refused
  (400: a retry would not help); one asking for nothing gets the budget shared
  among its sequences.

A request costing more than a limit allows at all is refused with 400, not 429.

``TenantLimiter`` counts in this process: with N gateway replicas a tenant gets
up to N times its limits. ``RedisLimiter`` (``LORAFLEET_REDIS_URL``) counts in
Redis for every replica at once, with the same rules, each admission one atomic
script: the bucket refills by Redis's clock, and every sequence in flight is a
lease that expires on its own if its gateway dies before releasing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serving.errors import APIError, ErrorCode
from serving.state.tenants import Limits, Tenant

log = logging.getLogger("lorafleet.limits")


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class TenantLimiter:
    clock: object = time.monotonic
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    _token_buckets: dict[int, _Bucket] = field(default_factory=dict)
    _in_flight: dict[int, int] = field(default_factory=dict)

    async def acquire(self, tenant: Tenant, cost: int = 1) -> Slot:
        return self.admit(tenant, cost)

    def admit(self, tenant: Tenant, cost: int = 1) -> Slot:
        """Take ``cost`` sequences' slots for ``tenant`` or raise 429; release the slot when the request ends."""
        limits = tenant.limits
        _refuse_oversized(limits, cost)
        now = self.clock()  # type: ignore[operator]
        if limits.requests_per_minute:
            rate = limits.requests_per_minute / 60.0
            bucket = self._buckets.get(tenant.id) or _Bucket(float(limits.requests_per_minute), now)
            bucket.tokens = min(float(limits.requests_per_minute), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            self._buckets[tenant.id] = bucket
            if bucket.tokens < cost:
                raise _over_rate(limits, math.ceil((cost - bucket.tokens) / rate))
        if limits.tokens_per_minute:
            tokens = self._refilled(self._token_buckets, tenant.id, limits.tokens_per_minute, now)
            if tokens.tokens <= 0:
                raise _over_tokens(limits, math.ceil(-tokens.tokens / (limits.tokens_per_minute / 60.0)) + 1)
        in_flight = self._in_flight.get(tenant.id, 0)
        if limits.max_concurrent and in_flight + cost > limits.max_concurrent:
            raise _over_concurrency(limits)
        if limits.requests_per_minute:
            self._buckets[tenant.id].tokens -= cost
        self._in_flight[tenant.id] = in_flight + cost
        return Slot(self, tenant.id, cost)

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """What a finished request used, against its tenant's tokens per minute."""
        per_minute = tenant.limits.tokens_per_minute
        if per_minute and tokens > 0:
            self._refilled(self._token_buckets, tenant.id, per_minute, self.clock()).tokens -= tokens  # type: ignore[operator]

    @staticmethod
    def _refilled(buckets: dict[int, _Bucket], tenant_id: int, capacity: int, now: float) -> _Bucket:
        bucket = buckets.setdefault(tenant_id, _Bucket(float(capacity), now))
        bucket.tokens = min(float(capacity), bucket.tokens + (now - bucket.stamp) * capacity / 60.0)
        bucket.stamp = now
        return bucket

    def _release(self, tenant_id: int, cost: int) -> None:
        self._in_flight[tenant_id] = max(0, self._in_flight.get(tenant_id, cost) - cost)

    def in_flight(self, tenant: Tenant) -> int:
        return self._in_flight.get(tenant.id, 0)


def _refuse_oversized(limits: Limits, cost: int) -> None:
    for limit, what in (
        (limits.requests_per_minute, "requests per minute"),
        (limits.max_concurrent, "concurrent requests"),
    ):
        if limit and cost > limit:
            raise APIError(
                ErrorCode.SEQUENCES_OVER_LIMIT,
                f"This request is {cost} sequences (n × prompts); this key's limit is {limit} "
                f"{what}. Send fewer prompts or a smaller n.",
                param="n",
            )


def _over_rate(limits: Limits, wait_s: int) -> APIError:
    return APIError(
        ErrorCode.RATE_LIMIT_EXCEEDED,
        f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
        headers={"Retry-After": str(wait_s)},
    )


def _over_tokens(limits: Limits, wait_s: int) -> APIError:
    return APIError(
        ErrorCode.TOKEN_RATE_LIMIT_EXCEEDED,
        f"Token rate limit reached: {limits.tokens_per_minute} tokens per minute (prompt and completion).",
        headers={"Retry-After": str(wait_s)},
    )


def _over_concurrency(limits: Limits) -> APIError:
    return APIError(
        ErrorCode.CONCURRENCY_LIMIT_EXCEEDED,
        f"Too many concurrent requests: the limit is {limits.max_concurrent}.",
        headers={"Retry-After": "1"},
    )


# One admission, atomically: refill the bucket by Redis's clock, check it, check the token bucket is above zero,
# drop the expired leases of gateways that died, check the sequences in flight, then take both. KEYS: bucket,
# leases, token bucket. ARGV: requests per minute (0: none), concurrent (0: none), cost, slot id, lease seconds,
# tokens per minute (0: none). Returns {1} admitted, {0, wait_s} over the rate, {-1} over the concurrency,
# {-2, wait_s} over the tokens per minute.
ADMIT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rpm, cap, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = 0
if rpm > 0 then
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
  tokens = tonumber(bucket[1]) or rpm
  local stamp = tonumber(bucket[2]) or now
  tokens = math.min(rpm, tokens + math.max(0, now - stamp) * rpm / 60)
  if tokens < cost then
    return {0, math.ceil((cost - tokens) / (rpm / 60))}
  end
end
local tpm = tonumber(ARGV[6])
if tpm > 0 then
  local spent = redis.call('HMGET', KEYS[3], 'tokens', 'stamp')
  local left = tonumber(spent[1]) or tpm
  left = math.min(tpm, left + math.max(0, now - (tonumber(spent[2]) or now)) * tpm / 60)
  if left <= 0 then
    return {-2, math.ceil(-left / (tpm / 60)) + 1}
  end
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) + cost > cap then
    return {-1, 1}
  end
  local expires = now + tonumber(ARGV[5])
  for i = 1, cost do
    redis.call('ZADD', KEYS[2], expires, ARGV[4] .. ':' .. i)
  end
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5])) + 60)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'tokens', tokens - cost, 'stamp', now)
  redis.call('EXPIRE', KEYS[1], 120)
end
return {1, 0}
"""


# What a finished request used, against the token bucket. KEYS: token bucket. ARGV: tokens per minute, tokens.
CHARGE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local spent = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local left = tonumber(spent[1]) or tpm
left = math.min(tpm, left + math.max(0, now - (tonumber(spent[2]) or now)) * tpm / 60) - used
redis.call('HSET', KEYS[1], 'tokens', left, 'stamp', now)
redis.call('EXPIRE', KEYS[1], math.max(120, math.ceil(-left / (tpm / 60)) + 60))
return 1
"""


class RedisLimiter:
    """The same limits as ``TenantLimiter``, counted in Redis for every gateway replica.

    Redis unreachable (or slower than ``timeout_s``): a limited tenant's request gets 503 ``limits_unavailable``
    (``fail_open`` false), or is admitted under this replica's own counts (``fail_open`` true). A tenant with no
    counting limit never waits for Redis.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.5,
        fail_open: bool = False,
        lease_s: float = 660.0,
        prefix: str = "lorafleet:limits",
    ) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self.timeout_s, self.fail_open, self.lease_s, self.prefix = timeout_s, fail_open, lease_s, prefix
        self.local = TenantLimiter()  # fail-open counts; also what this replica holds, for in_flight
        self._admit = self.client.register_script(ADMIT)
        self._charge = self.client.register_script(CHARGE)
        self._releases: set[asyncio.Task[None]] = set()
        self._warned_at = 0.0

    async def acquire(self, tenant: Tenant, cost: int = 1) -> Slot:
        limits = tenant.limits
        _refuse_oversized(limits, cost)
        if not limits.requests_per_minute and not limits.max_concurrent and not limits.tokens_per_minute:
            return self.local.admit(tenant, cost)
        slot_id = uuid.uuid4().hex
        keys = [f"{self.prefix}:{tenant.id}:bucket", f"{self.prefix}:{tenant.id}:leases", self._tokens_key(tenant)]
        try:
            verdict, wait = await asyncio.wait_for(
                self._admit(
                    keys=keys,
                    args=[
                        limits.requests_per_minute or 0,
                        limits.max_concurrent or 0,
                        cost,
                        slot_id,
                        self.lease_s,
                        limits.tokens_per_minute or 0,
                    ],
                ),
                timeout=2 * self.timeout_s,
            )
        except Exception as exc:  # connection refused, timeout, a Redis error: never hang, never crash
            return self._unreachable(tenant, cost, exc)
        if verdict == 0:
            raise _over_rate(limits, int(wait))
        if verdict == -1:
            raise _over_concurrency(limits)
        if verdict == -2:
            raise _over_tokens(limits, int(wait))
        slot = self.local.admit(_unlimited(tenant), cost)  # this replica's view of what it holds
        if limits.max_concurrent:
            slot.on_release(lambda: self._release(keys[1], [f"{slot_id}:{i}" for i in range(1, cost + 1)]))
        return slot

    def _unreachable(self, tenant: Tenant, cost: int, exc: BaseException) -> Slot:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            then = "admitting under this replica's own counts" if self.fail_open else "refusing limited tenants"
            log.warning("Redis unreachable for limits (%s: %s); %s", type(exc).__name__, exc, then)
        if self.fail_open:
            return self.local.admit(tenant, cost)
        raise APIError(
            ErrorCode.LIMITS_UNAVAILABLE,
            "Rate limits cannot be checked right now (their store is unreachable); retry shortly.",
            headers={"Retry-After": "2"},
        )

    def _tokens_key(self, tenant: Tenant) -> str:
        return f"{self.prefix}:{tenant.id}:tokens"

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """What a finished request used, against its tenant's tokens per minute (in Redis, in the background)."""
        per_minute = tenant.limits.tokens_per_minute
        if not per_minute or tokens <= 0:
            return
        self.local.charge(tenant, tokens)  # what failing open counts with
        charge = self._charge(keys=[self._tokens_key(tenant)], args=[per_minute, tokens])
        self._background(charge, f"could not charge {tokens} tokens in Redis")

    def _release(self, key: str, members: list[str]) -> None:
        failure = f"could not release {len(members)} sequence(s) in Redis; their leases expire on their own"
        self._background(self.client.zrem(key, *members), failure)

    def _background(self, call: Awaitable[Any], failure: str) -> None:
        async def run() -> None:
            try:
                await asyncio.wait_for(call, timeout=2 * self.timeout_s)
            except Exception as exc:  # never the request's problem
                log.warning("%s (%s)", failure, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def in_flight(self, tenant: Tenant) -> int:
        """Sequences this replica holds for ``tenant`` (Redis has every replica's)."""
        return self.local.in_flight(tenant)

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=2 * self.timeout_s)
        await self.client.aclose()


def _unlimited(tenant: Tenant) -> Tenant:
    return dataclasses.replace(tenant, limits=Limits())


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
            raise APIError(
                ErrorCode.MAX_TOKENS_OVER_LIMIT,
                f"'{name}' is {asked}{spread}; this key may ask for at most {limit} tokens per request.",
                param=name,
            )
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        if limit // sequences < 1:
            raise APIError(
                ErrorCode.MAX_TOKENS_OVER_LIMIT,
                f"{sequences} sequences (n × prompts) cannot share this key's budget of {limit} tokens per request.",
                param="n",
            )
        body["max_tokens"] = limit // sequences
