"""The gateway's HTTP client for vLLM: CPU time per streamed request, lorafleet's ``VLLMEngine`` against httpx.

    python -m benchmarks.engine_client [--requests 2000] [--events 66] [--rounds 3]

Every request and every streamed event a tenant gets passes through the
gateway's client for the engine, and on a machine whose cores the engine keeps
busy, the gateway's CPU time is latency: each millisecond of it is a
millisecond the gateway waits for a core. This program measures that client
alone. A separate process plays vLLM's OpenAI server (aiohttp, loopback):
each request gets a stream of ``--events`` server-sent events the size of
vLLM's chat chunks. In this process, one client at a time sends ``--requests``
streamed chat requests one after another (a body the size of the gateway's:
messages, chat template, cache salt) and reads every event.

Baseline: ``httpx.AsyncClient`` (what the gateway used before), with its
request trace reporting when the body is written. Candidate:
``serving.engines.vllm.VLLMEngine.send`` (aiohttp), the gateway's own code path.
Printed per client, median over ``--rounds`` alternating rounds: this
process's CPU time per streamed request, the time from the call until the
request body is written (the first-token path), and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpx
from aiohttp import web

from lorafleet.launch import free_port
from serving.config import GatewaySettings
from serving.engines.vllm import VLLMEngine

ROUTE = "/v1/chat/completions"
BODY = {
    "model": "orders@1",
    "messages": [{"role": "user", "content": "Extract the order as JSON: 3 blue widgets for Ann, ann@example.com"}],
    "max_tokens": 64,
    "stream": True,
    "stream_options": {"include_usage": True},
    "chat_template": "{% for message in messages %}<|im_start|>{{ message.role }}\n" * 12,
    "cache_salt": "0" * 32,
}
CHOICE = {"index": 0, "delta": {"content": " token"}, "logprobs": None, "finish_reason": None}
CHUNK = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 0, "model": "orders@1", "choices": [CHOICE]}


def play_engine(port: int, events: int) -> None:
    """vLLM's streaming chat route, as fast as it can answer (runs in its own process)."""
    event = b"data: " + json.dumps(CHUNK, separators=(",", ":")).encode() + b"\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(events):
            await resp.write(event)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post(ROUTE, chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


Send = Callable[[Callable[[], None]], Awaitable[None]]  # one streamed request, read to the end; calls back on write


def _since(start: float, into: list[float]) -> None:
    into.append(time.perf_counter() - start)


async def measure(send: Send, requests: int) -> tuple[float, float]:
    """(CPU ms per request, median ms from the call to the body written) over ``requests`` in a row."""
    written: list[float] = []
    for _ in range(20):  # connections open, code paths warm
        await send(lambda: None)
    cpu = time.process_time()
    for _ in range(requests):
        start = time.perf_counter()
        await send(partial(_since, start, written))
    return 1000 * (time.process_time() - cpu) / requests, 1000 * statistics.median(written)


async def run(url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"httpx (baseline)": [], "lorafleet VLLMEngine (aiohttp)": []}
    with tempfile.TemporaryDirectory() as tmp:
        engine = VLLMEngine(GatewaySettings(data_dir=Path(tmp), engine_url=url, dev_mode=True))
        client = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=5))

        async def via_httpx(on_sent: Callable[[], None]) -> None:
            async def trace(event: str, info: dict) -> None:
                if event == "http11.send_request_body.complete":
                    on_sent()

            request = client.build_request("POST", ROUTE, json=BODY, extensions={"trace": trace})
            resp = await client.send(request, stream=True)
            async for _ in resp.aiter_bytes():
                pass
            await resp.aclose()

        async def via_engine(on_sent: Callable[[], None]) -> None:
            resp = await engine.send(ROUTE, BODY, stream=True, on_sent=on_sent)
            async for _ in resp.aiter_bytes():
                pass
            await resp.aclose()

        try:
            for _ in range(args.rounds):
                for name, send in zip(results, (via_httpx, via_engine), strict=True):
                    results[name].append(await measure(send, args.requests))
        finally:
            await client.aclose()
            await engine.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="streamed requests per client per round")
    parser.add_argument("--events", type=int, default=66, help="events per stream (64 tokens, usage, role)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=play_engine, args=(port, args.events), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.post(url + ROUTE, json={}, timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        results = asyncio.run(run(url, args))
    finally:
        server.terminate()
        server.join()

    print(
        f"\nengine client: {args.requests} streamed requests of {args.events} events per client and round, "
        f"one at a time, against a loopback server; medians of {args.rounds} alternating rounds"
    )
    header = f"{'client':<32} | {'CPU ms/request':>14} | {'x base':>6} | {'body written ms':>15} | {'x base':>6}"
    print(header)
    print("-" * len(header))
    base_cpu = base_written = 0.0
    for name, rounds in results.items():
        cpu = statistics.median(r[0] for r in rounds)
        written = statistics.median(r[1] for r in rounds)
        base_cpu, base_written = base_cpu or cpu, base_written or written
        print(f"{name:<32} | {cpu:>14.3f} | {cpu / base_cpu:>6.2f} | {written:>15.3f} | {written / base_written:>6.2f}")


if __name__ == "__main__":
    main()
