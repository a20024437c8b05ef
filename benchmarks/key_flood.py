"""The gateway's own time per valid request while a flood of made-up API keys arrives.

    python -m benchmarks.key_flood              # make bench runs it too

A real gateway and vLLM engine serve 8 concurrent streamed chat completions
(one adapter); in the flood pass, another client sends requests with random
``lf-…`` keys at 200 per second at the same time. The figure is ``gateway_s``
from the access log (request in to request handed to the engine client: auth,
routing, the body rewrite) for the valid requests. Baseline: the same streams
without the flood, measured in the same run. Unknown keys are answered from a
negative cache after their first database read, in a worker thread, so the
event loop that relays every stream never waits on the database.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.gateway_overhead import PROMPTS, access_log, adapter_dir
from benchmarks.wire_timing import pct
from contract.settings import CommonSettings
from contract.store import AdapterStore
from lorafleet.launch import start_gateway
from serving.state.tenants import TenantStore


async def streams(url: str, key: str, seconds: float, concurrency: int, tag: str) -> int:
    """``concurrency`` workers streaming short completions back to back for ``seconds``; returns the count."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        nonlocal done
        # Staggered starts: 8 streams in steady state, not 8 requests arriving in the same millisecond at each
        # pass's start (the loop would handle them one after another: a queue the harness made, not the flood).
        await asyncio.sleep(w * 0.4)
        i = 0
        while time.monotonic() < deadline:
            body = {
                "model": "orders",
                "messages": [{"role": "user", "content": PROMPTS[(w * 31 + i) % len(PROMPTS)]}],
                "max_tokens": 16,
                "stream": True,
            }
            headers = {"Authorization": f"Bearer {key}", "X-Request-ID": f"{tag}-{w}-{i}"}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status_code == 200, await resp.aread()
                async for _ in resp.aiter_bytes():
                    pass
            done += 1
            i += 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client, w) for w in range(concurrency)))
    return done


async def flood(url: str, rate: float, seconds: float) -> tuple[int, int]:
    """Requests with made-up keys at ``rate`` per second (open loop); returns (sent, answered 401)."""
    sent = refused = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one() -> None:
            nonlocal refused
            headers = {"Authorization": f"Bearer lf-{secrets.token_urlsafe(32)}"}
            resp = await client.post(
                f"{url}/v1/chat/completions", json={"model": "orders", "messages": []}, headers=headers
            )
            refused += resp.status_code == 401

        tasks = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            tasks.append(asyncio.create_task(one()))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return sent, refused


def _flood_process(url: str, rate: float, seconds: float, out: Any) -> None:
    out.put(asyncio.run(flood(url, rate, seconds)))


def run_pass(url: str, key: str, seconds: float, concurrency: int, rate: float, tag: str) -> tuple[int, int]:
    """One pass; the flood, when there is one, comes from another process (another client, as in production)."""
    if rate <= 0:
        return asyncio.run(streams(url, key, seconds, concurrency, tag)), 0
    results: Any = multiprocessing.Queue()
    flooder = multiprocessing.Process(target=_flood_process, args=(url, rate, seconds, results))
    flooder.start()
    done = asyncio.run(streams(url, key, seconds, concurrency, tag))
    sent, refused = results.get(timeout=seconds + 120)
    flooder.join()
    assert refused == sent, f"{sent - refused} made-up keys were not refused with 401"
    return done, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each pass")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent valid streams")
    parser.add_argument("--rate", type=float, default=200.0, help="made-up keys per second in the flood pass")
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/flood pass pairs")
    args = parser.parse_args()

    settings = CommonSettings()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        AdapterStore(work / "adapters").publish(adapter_dir(settings, work), "orders")
        tenants = TenantStore(f"sqlite:///{work / 'state.db'}")
        tenant = tenants.create("bench")
        tenants.grant(tenant, "orders")
        key = tenants.issue_key(tenant)
        gw = start_gateway(work, Path(settings.base_model_path()))
        counts: dict[str, list[int]] = {"baseline": [0, 0], "flood": [0, 0]}
        try:
            run_pass(gw.url, key, 5, args.concurrency, 0, "warmup")
            for round_ in range(args.rounds):
                for name, rate in (("baseline", 0.0), ("flood", args.rate)):
                    done, sent = run_pass(gw.url, key, args.seconds, args.concurrency, rate, f"{name}{round_}")
                    counts[name][0] += done
                    counts[name][1] += sent
        finally:
            gw.stop()
        entries = access_log(work / "gateway.log")

    print(
        f"\ngateway's own time (gateway_s) per valid streamed request: {args.concurrency} concurrent streams, "
        f"{args.rounds} rounds of {args.seconds:.0f} s per pass; flood: {args.rate:.0f} made-up keys/s"
    )
    header = (
        f"{'pass':<34} | {'valid':>6} | {'401s':>6} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | {'> 5 ms':>6}"
    )
    print(header)
    print("-" * len(header))
    figures = {}
    for name, label in (("baseline", "streams alone (baseline)"), ("flood", "streams + made-up-key flood")):
        own = [
            e["gateway_s"]
            for rid, e in entries.items()
            if rid.startswith(name) and e.get("status") == 200 and e.get("gateway_s") is not None
        ]
        figures[name] = (statistics.median(own), pct(own, 0.99))
        slow = sum(t > 0.005 for t in own)
        print(
            f"{label:<34} | {len(own):>6} | {counts[name][1]:>6} | {1000 * figures[name][0]:>7.2f} | "
            f"{1000 * figures[name][1]:>7.2f} | {1000 * max(own):>7.2f} | {slow:>6}"
        )
    ratio = figures["flood"][1] / figures["baseline"][1]
    print(f"{'flood / baseline (p99)':<34} | {'':>6} | {'':>6} | {'':>7} | {ratio:>6.2f}x |")
    goal = figures["flood"][1] < 0.005
    print(
        f"goal: p99 of the gateway's own time under the flood < 5 ms: {'met' if goal else 'NOT met'} "
        f"({1000 * figures['flood'][1]:.2f} ms)"
    )


if __name__ == "__main__":
    main()
