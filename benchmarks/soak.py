"""A bounded soak of the whole fleet: two gateways, two engines, PostgreSQL and Redis, with operations on a schedule.

    python -m benchmarks.soak [--minutes 10] [--rate 2] [--max-tokens 16]

Two vLLM engines (one core each) behind two gateways sharing a PostgreSQL
database, a Redis and one adapter store; open-loop streamed chat completions
(Poisson, ``--rate`` per second) to ``orders`` and the bare base model, each
request through either gateway at random, from two tenants. On the schedule
(fractions of the run): 0.15 a new version of ``orders`` is published through
gateway A; 0.20 a canary of it starts through A (steps 50, 100); 0.45 tenant
``leaving``'s key is revoked through gateway B; 0.55 engine 2 is killed
(SIGKILL), 0.70 started again; 0.85 ``orders`` is promoted by hand through B
(back to the version the canary did not choose, or forward).

Printed: requests by outcome and cause per phase, TTFT p50/p99 per phase, the
operations' answers, and each gateway's RSS after the warm-up and at the end.
Expected, not failures: ``leaving``'s 401 after its revocation, and streams
in flight on engine 2 when it was killed (each must end with an error event
and ``[DONE]``, none hang). Goals: no other failed request; RSS growth under
5% per gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.gateway_overhead import PROMPTS, adapter_dir
from benchmarks.wire_timing import pct
from contract.settings import CommonSettings
from lorafleet.launch import (
    PostgresServer,
    RedisServer,
    RunningEngine,
    RunningGateway,
    free_port,
    start_engine,
    start_gateway,
)
from serving.state.ledger import open_store
from serving.state.tenants import TenantStore, key_id_of

SCHEDULE = [(0.15, "publish"), (0.20, "canary"), (0.45, "revoke"), (0.55, "kill"), (0.70, "restart"), (0.85, "promote")]
PHASES = ["steady", "publish", "canary", "revoke", "kill", "restart", "promote"]


@dataclass
class Outcome:
    phase: str
    tenant: str
    gateway: str
    status: str  # "ok", an HTTP status, "stream_error", or an exception's name
    ttft: float | None = None
    started: float = 0.0


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    phase: str = "steady"
    killed_at: float | None = None
    revoked_at: float | None = None
    operations: list[str] = field(default_factory=list)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def request(
    client: httpx.AsyncClient, soak: Soak, gateways: dict[str, str], tenant: str, key: str, i: int, max_tokens: int
) -> None:
    name = random.choice(sorted(gateways))
    body = {
        "model": random.choice(["orders", "base"]),
        "messages": [{"role": "user", "content": PROMPTS[i % 8]}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "user": f"user-{i % 50}",
    }
    outcome = Outcome(soak.phase, tenant, name, "ok", started=time.monotonic())
    soak.outcomes.append(outcome)
    try:
        async with client.stream(
            "POST", f"{gateways[name]}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            if resp.status_code != 200:
                outcome.status = str(resp.status_code)
                await resp.aread()
                return
            done = False
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        outcome.status = "stream_error"
                    elif outcome.ttft is None:
                        outcome.ttft = time.monotonic() - outcome.started
            if not done:
                outcome.status = "no_done"
    except Exception as exc:  # a hang (the client's timeout) or a connection failure
        outcome.status = type(exc).__name__


def admin(gw: RunningGateway, method: str, path: str, **kw: object) -> str:
    answer = httpx.request(
        method, f"{gw.url}/admin{path}", headers={"Authorization": f"Bearer {gw.admin_key}"}, timeout=120, **kw
    )  # type: ignore[arg-type]
    return f"{method} {path}: {answer.status_code} {answer.text[:160]}"


async def operate(
    soak: Soak,
    args: argparse.Namespace,
    a: RunningGateway,
    b: RunningGateway,
    engines: dict[str, RunningEngine],
    revive: dict[str, object],
    leaving_key: str,
) -> None:
    started = time.monotonic()
    for at, action in SCHEDULE:
        await asyncio.sleep(max(0.0, started + at * args.minutes * 60 - time.monotonic()))
        soak.phase = action
        if action == "publish":
            result = await asyncio.to_thread(
                admin, a, "POST", "/adapters/orders/versions", json={"path": str(revive["candidate"])}
            )
        elif action == "canary":
            interval = max(5.0, 0.1 * args.minutes * 60)
            result = await asyncio.to_thread(
                admin,
                a,
                "POST",
                "/canaries/orders",
                json={
                    "version": 2,
                    "steps": [50, 100],
                    "interval_s": interval,
                    "min_samples": 10,
                    "force": True,
                    "max_latency_ratio": 10,
                    "reason": "soak",
                },
            )
        elif action == "revoke":
            soak.revoked_at = time.monotonic()
            result = await asyncio.to_thread(admin, b, "DELETE", f"/tenants/leaving/keys/{key_id_of(leaving_key)}")
        elif action == "kill":
            soak.killed_at = time.monotonic()
            os.killpg(engines["e2"].proc.pid, signal.SIGKILL)
            result = "engine e2 killed (SIGKILL)"
        elif action == "restart":
            engines["e2"] = await asyncio.to_thread(
                start_engine,
                revive["work"],
                revive["base"],
                port=revive["port"],
                key=engines["e2"].key,
                max_loras="2",
                kv_cache_gib="1",
                cpus="1",
            )  # type: ignore[arg-type]
            result = "engine e2 started again"
        else:
            stable = await asyncio.to_thread(revive["store"].stable, "orders")  # type: ignore[attr-defined]
            target = 1 if stable is not None and stable.version == 2 else 2
            result = await asyncio.to_thread(
                admin, b, "POST", "/adapters/orders/promote", json={"version": target, "force": True, "reason": "soak"}
            )
        soak.operations.append(f"{at:.2f} {action}: {result}")
        print(soak.operations[-1], flush=True)


async def traffic(soak: Soak, args: argparse.Namespace, gateways: dict[str, str], keys: dict[str, str]) -> None:
    rng = random.Random(args.seed)
    end = time.monotonic() + args.minutes * 60
    tasks = []
    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=512)) as client:
        i = 0
        while time.monotonic() < end:
            tenant = "leaving" if rng.random() < 0.1 else "steady"
            tasks.append(asyncio.create_task(request(client, soak, gateways, tenant, keys[tenant], i, args.max_tokens)))
            i += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)


def expected(o: Outcome, soak: Soak) -> bool:
    """A refusal the schedule asked for: the revoked tenant's 401, or a stream on the engine killed under it."""
    if o.tenant == "leaving" and o.status == "401" and soak.revoked_at is not None and o.started >= soak.revoked_at:
        return True
    killed = soak.killed_at
    return o.status == "stream_error" and killed is not None and o.started <= killed <= o.started + 600


def report(soak: Soak, rss: dict[str, tuple[int, int]]) -> int:
    by_phase: dict[str, list[Outcome]] = defaultdict(list)
    for o in soak.outcomes:
        by_phase[o.phase].append(o)
    print("\n| phase | requests | ok | expected refusals | failed | TTFT p50 | TTFT p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    failures: Counter[str] = Counter()
    for phase in PHASES:
        rows = by_phase.get(phase, [])
        if not rows:
            continue
        ok = [o for o in rows if o.status == "ok"]
        exp = [o for o in rows if o.status != "ok" and expected(o, soak)]
        failed = [o for o in rows if o.status != "ok" and not expected(o, soak)]
        failures.update(f"{o.status} ({o.phase}, {o.tenant}, gateway {o.gateway})" for o in failed)
        ttft = [o.ttft for o in ok if o.ttft is not None]
        p50, p99 = (f"{pct(ttft, 0.5):.2f} s", f"{pct(ttft, 0.99):.2f} s") if ttft else ("-", "-")
        print(f"| {phase} | {len(rows)} | {len(ok)} | {len(exp)} | {len(failed)} | {p50} | {p99} |")
    print("\nfailed requests by cause:", dict(failures) or "none")
    print("\n| gateway | RSS after warm-up | RSS at end | growth |")
    print("|---|---:|---:|---:|")
    grew = False
    for name, (start, end) in rss.items():
        growth = (end - start) / start if start else 0.0
        grew |= growth >= 0.05
        print(f"| {name} | {start / 1024:.1f} MiB | {end / 1024:.1f} MiB | {100 * growth:+.1f}% |")
    total = sum(failures.values())
    print(
        f"\ngoals: no failed request ({'met' if total == 0 else f'NOT met: {total}'}); RSS growth under 5% "
        f"({'NOT met' if grew else 'met'})"
    )
    return 0 if total == 0 and not grew else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second, open loop")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="a request longer than this counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    settings = CommonSettings()
    base = Path(settings.base_model_path())
    work = Path(tempfile.mkdtemp(prefix="lorafleet-soak-"))
    source = adapter_dir(settings, work)
    candidate = work / "gw-a" / "runs" / "orders-v2"
    shutil.copytree(source, candidate)
    postgres = PostgresServer.create()
    redis = RedisServer.start(work / "redis")
    database = postgres.database()
    tenants = TenantStore(database)
    keys = {}
    for name in ("steady", "leaving"):
        tenant = tenants.create(name)
        for alias in ("orders", "base"):
            tenants.grant(tenant, alias)
        keys[name] = tenants.issue_key(tenant)
    store_dir = work / "gw-a" / "adapters"
    store = open_store(CommonSettings(data_dir=work / "gw-a", database_url=database))  # the ledger in PostgreSQL
    store.publish(source, "orders")
    store.promote("orders", 1, force=True, reason="soak baseline")
    (work / "gw-b").mkdir()
    (work / "gw-b" / "adapters").symlink_to(store_dir)  # one store, seen by both gateways at the same files
    port = free_port()
    engines = {
        "e1": start_engine(work / "e1", base, max_loras="2", kv_cache_gib="1", cpus="0"),
        "e2": start_engine(work / "e2", base, max_loras="2", kv_cache_gib="1", cpus="1", port=port),
    }
    lines = ["engines:"]
    for name, engine in engines.items():
        lines += [f"  - name: {name}", f"    url: {engine.url}", f"    key: {engine.key}", "    max_loras: 2"]
    (work / "engines.yaml").write_text("\n".join(lines) + "\n")
    shared = {
        "engines_file": str(work / "engines.yaml"),
        "database_url": database,
        "redis_url": redis.url,
        "state_cache_s": "60",
        "canary_poll_s": "1",
    }
    gateways: dict[str, RunningGateway] = {}
    try:
        for name in ("a", "b"):
            gateways[name] = start_gateway(work / f"gw-{name}", base, **shared)
        revive = {"work": work / "e2", "base": base, "port": port, "candidate": candidate, "store": store}
        soak = Soak()
        urls = {name: gw.url for name, gw in gateways.items()}

        async def run() -> dict[str, tuple[int, int]]:
            warm = asyncio.create_task(asyncio.sleep(min(60.0, 0.05 * args.minutes * 60)))
            load = asyncio.create_task(traffic(soak, args, urls, keys))
            ops = asyncio.create_task(
                operate(soak, args, gateways["a"], gateways["b"], engines, revive, keys["leaving"])
            )
            await warm
            start = {name: rss_kib(gw.proc.pid) for name, gw in gateways.items()}
            await asyncio.gather(load, ops)
            return {name: (start[name], rss_kib(gw.proc.pid)) for name, gw in gateways.items()}

        print(f"soak: {args.minutes:g} min at {args.rate:g} requests/s, {args.max_tokens} tokens each", flush=True)
        rss = asyncio.run(run())
        return report(soak, rss)
    finally:
        for gw in gateways.values():
            gw.stop()
        for engine in engines.values():
            engine.stop()
        redis.stop()
        postgres.remove()


if __name__ == "__main__":
    raise SystemExit(main())
