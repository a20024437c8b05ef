"""The gateway benchmark's load generator: open-loop arrivals, the concurrency cap, what it counts."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from aiohttp import web

from benchmarks.gateway_overhead import ENDPOINT, Pass, print_goals, run_pass
from tests.conftest import serve


class Server:
    """Streams two events and a usage chunk after ``delay`` seconds; records arrivals and the most in flight."""

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.most = delay, 0, 0
        self.arrivals: list[float] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrivals.append(time.perf_counter())
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(self.delay)
            for chunk in (
                {"choices": [{"delta": {"content": "hi"}}]},
                {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}},
            ):
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


def run(server: Server, n: int, concurrency: int, rate: float, seed: int = 0) -> Pass:
    async def main() -> Pass:
        app = web.Application()
        app.router.add_post(ENDPOINT, server.chat)
        async with serve(app) as url:
            target = {"base": url.rstrip("/"), "headers": {}, "models": ["a1", "a2"], "extra": {}}
            return await run_pass(target, n, concurrency, 5, 2, rate, seed)

    return asyncio.run(main())


def test_a_closed_loop_keeps_the_concurrency_full_and_no_more() -> None:
    server = Server(delay=0.05)
    result = run(server, n=12, concurrency=4, rate=float("inf"))
    assert server.most == 4
    assert len(result.ttft) == len(result.e2e) == len(result.first_event) == 12 and result.tokens == 12 * 5


def test_open_loop_arrivals_follow_the_seeded_poisson_schedule() -> None:
    rate, n, seed = 5.0, 8, 3
    gaps = random.Random(seed)
    expected = sum(gaps.expovariate(rate) for _ in range(n - 1))  # the sleeps between the n arrivals
    open_loop, closed_loop = Server(delay=0.0), Server(delay=0.0)
    run(open_loop, n, concurrency=n, rate=rate, seed=seed)
    run(closed_loop, n, concurrency=n, rate=float("inf"))
    span = open_loop.arrivals[-1] - open_loop.arrivals[0]
    assert span >= 0.9 * expected  # a timer never fires early
    assert closed_loop.arrivals[-1] - closed_loop.arrivals[0] < expected / 2  # all at once


def test_the_goals_verdict_names_each_goal_missed(capsys: pytest.CaptureFixture[str]) -> None:
    print_goals(0.99, [0.001] * 98 + [0.012] * 2)  # p99 is the 99th of 100 values: 12 ms
    out = " ".join(capsys.readouterr().out.split())
    assert "throughput >= 0.97x direct 0.990x met" in out
    assert "added TTFT p50 <= 3 ms 1.00 ms met" in out
    assert "added TTFT p99 <= 10 ms 12.00 ms NOT MET" in out
    print_goals(0.95, [])
    out = " ".join(capsys.readouterr().out.split())
    assert "0.950x NOT MET" in out and "no request was matched" in out
