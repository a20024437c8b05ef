"""What the gateway costs on top of vLLM: one streamed LoRA workload, straight to the engine vs through the gateway.

    python -m benchmarks.gateway_overhead [--requests 200] [--concurrency 8] [--request-rate 1.5]
                                          [--max-tokens 64] [--adapters 4] [--client own|vllm]

One vLLM server (the one the gateway supervises), one workload: ``--requests``
streamed chat completions arriving open-loop, ``--request-rate`` per second
at random (Poisson) times, as vLLM's serving benchmark sends them, with at
most ``--concurrency`` in flight (a request arriving while they are waits for
one to end; the default rate is above what a 2-core CPU serves, so the
concurrency stays full; ``--request-rate inf`` is a closed loop: all arrive at
once and each of ``--concurrency`` slots sends the next when one ends), exactly
``--max-tokens`` output tokens each (``ignore_eos``), spread round-robin over
``--adapters`` LoRA adapters. Baseline: straight to vLLM's OpenAI server, naming
the loaded adapter (``a1@1``) and the chat template. Candidate: through the
gateway with a tenant key and the alias (``a1``), which adds auth, limits,
alias resolution, the recorded template, the per-tenant cache salt, the JSON
check and the proxy hop. The two passes alternate (baseline, gateway,
baseline, gateway, ...) over ``--rounds`` so machine noise hits both alike.

Printed: output tokens/s, time to first token and end-to-end latency
percentiles for both, with the gateway/direct ratios and added milliseconds.
Those differences are between two sets of requests, and with 8 streams on a
few cores the engine alone spreads them by hundreds of milliseconds. So the
latency the gateway adds is also measured per request: each gateway request
carries an ``X-Request-ID``, and its time to first event at the client, less
the time the gateway waited for the engine's first event (``engine_ttft_s`` in
the access log, from the moment the request left for the engine), is what the
gateway added in front of the engine and on the way back. Counted from the
client's start, that holds the client's own time too (building and writing
the request, which a direct request pays as well): an upper bound. Counted
from the moment the request is on the wire (httpx's request trace), it is the
hop in, the gateway's own work and the hop out; the hop to the engine and
back counts as engine time, as a direct request's one hop does not count as
gateway time. A first event the gateway reads late counts as engine time; so
the mean is measured a third way, unbiased: each pass subtracts the engine's
own mean TTFT (vLLM's ``vllm:time_to_first_token_seconds`` histogram, read
before and after the pass) from the client's mean time to first event, and
the gateway's figure less the direct one is what the gateway adds. A packet
capture measures the time inside the gateway with no clock of its own
(``benchmarks/wire_timing.py``).
With ``--client vllm`` the load comes from vLLM's own serving benchmark
(``vllm bench serve``'s code, called in-process because the ``vllm`` command
needs package metadata the CPU wheel lacks): random-token prompts of
``--input-len`` tokens, the same concurrency, output length, adapters
(round-robin) and alternation, and its request ids joined with the access log.
Goals: throughput >= 0.97x direct; added median TTFT <= 3 ms; added p99 <= 10 ms, judged at the end of the
output on the per-request figure counted from the request on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.wire_timing import WARM_UP, pct
from contract.settings import CommonSettings
from contract.store import AdapterStore
from lorafleet.launch import start_engine, start_gateway
from serving.state.tenants import TenantStore

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line)["instruction"] for line in (ROOT / "data/orders/test.jsonl").read_text().splitlines()]


def adapter_dir(settings: CommonSettings, work: Path) -> Path:
    """The published demo adapter, else a tiny one trained now: speed does not depend on quality."""
    published = AdapterStore(settings.adapters_dir).serving("orders")
    if published is not None:
        return published.path
    import subprocess
    import sys

    out = work / "orders"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "train",
            "--data",
            str(ROOT / "data/orders/train.jsonl"),
            "--out",
            str(out),
            "--task",
            "orders",
            "--max-steps",
            "4",
            "--batch-size",
            "4",
        ],
        check=True,
        cwd=ROOT,
    )
    return out


@dataclass
class Pass:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    first_event: dict[str, float] = field(default_factory=dict)  # request id -> time to its first event
    on_wire: dict[str, float] = field(default_factory=dict)  # request id -> the client's own time before sending
    engine_ttft: float = 0.0  # sum of vLLM's own TTFT over the pass's requests
    engine_requests: float = 0.0


ENDPOINT = "/v1/chat/completions"
LOAD_GENERATORS = {"own": "this module's httpx client", "vllm": "vLLM's serving benchmark"}


def engine_ttft_totals(engine_url: str) -> tuple[float, float]:
    """(sum, count) of vLLM's time-to-first-token histogram, over its adapters."""
    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{engine_url}/metrics", timeout=30).text):
        if family.name == "vllm:time_to_first_token_seconds":
            for sample in family.samples:
                total += sample.value if sample.name.endswith("_sum") else 0.0
                count += sample.value if sample.name.endswith("_count") else 0.0
    return total, count


async def one(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict, result: Pass, id_prefix: str = ""
) -> None:
    rid = id_prefix + uuid.uuid4().hex
    started = time.perf_counter()
    first = None

    async def trace(event: str, info: dict) -> None:  # httpx's request trace: when the body is on the wire
        if event == "http11.send_request_body.complete":
            result.on_wire[rid] = time.perf_counter() - started

    headers = headers | {"X-Request-ID": rid}
    async with client.stream("POST", url, json=body, headers=headers, extensions={"trace": trace}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            result.first_event.setdefault(rid, time.perf_counter() - started)
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter()
            if chunk.get("usage"):
                result.tokens += int(chunk["usage"]["completion_tokens"])
    end = time.perf_counter()
    result.ttft.append((first or end) - started)
    result.e2e.append(end - started)


async def run_pass(
    target: dict,
    n: int,
    concurrency: int,
    max_tokens: int,
    adapters: int,
    rate: float = float("inf"),
    seed: int = 0,
    id_prefix: str = "",
) -> Pass:
    """``n`` requests arriving ``rate`` per second (Poisson; ``inf``: all at once), ``concurrency`` at most in flight.

    Arrivals as vLLM's serving benchmark makes them (``--request-rate``, ``--max-concurrency``): a request that
    arrives while ``concurrency`` are in flight waits for one to end.
    """
    result = Pass()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gaps = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        slots = asyncio.Semaphore(concurrency)

        async def send(i: int) -> None:
            body = {
                "model": target["models"][i % adapters],
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            } | target["extra"]
            async with slots:
                await one(client, f"{target['base']}{ENDPOINT}", target["headers"], body, result, id_prefix)

        started = time.perf_counter()
        requests = []
        for i in range(n):
            requests.append(asyncio.create_task(send(i)))
            if rate != float("inf"):
                await asyncio.sleep(gaps.expovariate(rate))
        await asyncio.gather(*requests)
        result.wall = time.perf_counter() - started
    return result


def run_vllm_pass(target: dict, n: int, args: argparse.Namespace, tokenizer: str, seed: int) -> Pass:
    """One pass with vLLM's serving benchmark as the load generator (its client, its clock, its TTFT)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as vllm_bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    prefix = f"vb-{uuid.uuid4().hex[:12]}-"
    argv = [
        "--backend",
        "openai-chat",
        "--base-url",
        target["base"],
        "--endpoint",
        ENDPOINT,
        "--model",
        target["models"][0],
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.max_tokens),
        "--ignore-eos",
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(args.concurrency),
        "--request-rate",
        str(args.request_rate),
        "--temperature",
        "0",
        "--lora-modules",
        *target["models"],
        "--lora-assignment",
        "round-robin",
        "--request-id-prefix",
        prefix,
        "--seed",
        str(seed),
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-detailed",
    ]
    if target["extra"]:
        argv += ["--extra-body", json.dumps(target["extra"])]
    for name, value in target["headers"].items():
        argv += ["--header", f"{name}={value}"]
    result = vllm_bench_serve(parser.parse_args(argv))
    if result["failed"]:
        raise SystemExit(f"vLLM's benchmark saw {result['failed']} failed requests: {set(result['errors']) - {''}}")
    ttfts, latencies = result["ttfts"], result["latencies"]
    return Pass(
        ttft=list(ttfts),
        e2e=list(latencies),
        tokens=int(result["total_output_tokens"]),
        wall=float(result["duration"]),
        first_event={f"{prefix}{i}": t for i, t in enumerate(ttfts)},
    )


def access_log(log: Path) -> dict[str, dict]:
    """The gateway's JSON access log entries for chat completions, by request id."""
    marker = "lorafleet.access: "
    entries = {}
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            entry = json.loads(line.split(marker, 1)[1])
            if entry.get("route") == ENDPOINT:
                entries[entry["request_id"]] = entry
    return entries


def main() -> None:
    args = parse_args()
    settings = CommonSettings()
    merged, entries = measure(args, settings)
    report(args, settings, merged, entries)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=1.5,
        help="requests per second, Poisson arrivals (inf: all at once, a closed loop of --concurrency workers); "
        "the default is above a 2-core CPU's capacity, so --concurrency stays full",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating pass pairs; each pass is --requests/rounds")
    parser.add_argument(
        "--client",
        choices=sorted(LOAD_GENERATORS),
        default="own",
        help="load generator: this module's httpx client, or vLLM's serving benchmark",
    )
    parser.add_argument("--input-len", type=int, default=96, help="prompt tokens (--client vllm: random tokens)")
    return parser.parse_args()


def measure(args: argparse.Namespace, settings: CommonSettings) -> tuple[dict[str, Pass], dict[str, dict]]:
    """One engine, the gateway in front of it, and the alternating passes: each target's merged pass, and the
    gateway's access log by request id."""
    names = [f"a{i + 1}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = adapter_dir(settings, work)
        store = AdapterStore(work / "adapters")
        for name in names:
            store.publish(source, name)
        tenants = TenantStore(f"sqlite:///{work / 'state.db'}")
        tenant = tenants.create("bench")
        for name in names:
            tenants.grant(tenant, name)
        key = tenants.issue_key(tenant)
        template = json.loads((source / "lorafleet.json").read_text())["prompt_format"]["chat_template"]
        # vLLM started as the gateway starts its child, with a key this program knows: the baseline calls it
        # directly, and the gateway is pointed at it (a gateway's own child answers only that gateway).
        vllm = start_engine(work, Path(settings.base_model_path()), max_loras=str(args.adapters))
        gw = start_gateway(
            work,
            Path(settings.base_model_path()),
            max_loras=str(args.adapters),
            engine_url=vllm.url,
            engine_key=vllm.key,
        )
        try:
            targets = {
                "direct to vLLM (baseline)": {
                    "base": vllm.url,
                    "headers": {"Authorization": f"Bearer {vllm.key}"},
                    "models": [f"{n}@1" for n in names],
                    "extra": {"chat_template": template},
                },
                "through the gateway": {
                    "base": gw.url,
                    "headers": {"Authorization": f"Bearer {key}"},
                    "models": names,
                    "extra": {},
                },
            }
            for target in targets.values():  # warm-up: every adapter loaded, paths compiled; its ids say so
                asyncio.run(run_pass(target, 2 * args.adapters, args.adapters, 4, args.adapters, id_prefix=WARM_UP))
            per_round = max(1, args.requests // args.rounds)
            merged = {name: Pass() for name in targets}
            for round_ in range(args.rounds):
                for name, target in targets.items():
                    one_pass(args, settings, vllm.url, target, per_round, round_, merged[name])
        finally:
            gw.stop()
            vllm.stop()
        return merged, access_log(work / "gateway.log")


def one_pass(
    args: argparse.Namespace, settings: CommonSettings, engine_url: str, target: dict, n: int, seed: int, into: Pass
) -> None:
    """``n`` requests to ``target``, added to ``into`` with the engine's own TTFT over the pass."""
    before = engine_ttft_totals(engine_url)
    if args.client == "vllm":  # the same prompts (seed) for both targets in a round
        p = run_vllm_pass(target, n, args, settings.base_model_path(), seed=seed)
    else:
        load = run_pass(target, n, args.concurrency, args.max_tokens, args.adapters, args.request_rate, seed=seed)
        p = asyncio.run(load)
    after = engine_ttft_totals(engine_url)
    into.engine_ttft += after[0] - before[0]
    into.engine_requests += after[1] - before[1]
    into.ttft += p.ttft
    into.e2e += p.e2e
    into.tokens += p.tokens
    into.wall += p.wall
    into.first_event |= p.first_event
    into.on_wire |= p.on_wire


def report(
    args: argparse.Namespace, settings: CommonSettings, merged: dict[str, Pass], entries: dict[str, dict]
) -> None:
    """The table, the engine-independent mean, the per-request figures and the goals."""
    base, gate = merged["direct to vLLM (baseline)"], merged["through the gateway"]
    print(
        f"\ngateway overhead: {len(base.e2e)} streamed requests per target, {args.request_rate}/s, "
        f"at most {args.concurrency} concurrent, "
        f"{args.max_tokens} output tokens each, over {args.adapters} LoRA adapters on "
        f"{Path(settings.base_model_path()).name}; {args.rounds} alternating rounds; "
        f"load from {LOAD_GENERATORS[args.client]}"
    )
    header = f"{'target':<26} | {'tok/s':>7} | {'TTFT p50':>8} | {'TTFT p99':>8} | {'e2e p50':>8} | {'e2e p99':>8}"
    print(header + "  (ms)")
    print("-" * len(header))
    for name, p in merged.items():
        print(
            f"{name:<26} | {p.tokens / p.wall:>7.1f} | {1000 * statistics.median(p.ttft):>8.1f} | "
            f"{1000 * pct(p.ttft, 0.99):>8.1f} | {1000 * statistics.median(p.e2e):>8.1f} | "
            f"{1000 * pct(p.e2e, 0.99):>8.1f}"
        )
    ratio = (gate.tokens / gate.wall) / (base.tokens / base.wall)
    print(
        f"{'gateway / direct':<26} | {ratio:>6.3f}x | "
        f"{1000 * (statistics.median(gate.ttft) - statistics.median(base.ttft)):>+8.1f} | "
        f"{1000 * (pct(gate.ttft, 0.99) - pct(base.ttft, 0.99)):>+8.1f} | "
        f"{1000 * (statistics.median(gate.e2e) - statistics.median(base.e2e)):>+8.1f} | "
        f"{1000 * (pct(gate.e2e, 0.99) - pct(base.e2e, 0.99)):>+8.1f}"
    )
    if base.engine_requests and gate.engine_requests:
        engine = [1000 * p.engine_ttft / p.engine_requests for p in (base, gate)]
        print(
            f"(two sets of requests: vLLM's own mean TTFT was {engine[0]:.1f} ms in the direct passes and "
            f"{engine[1]:.1f} ms in the gateway's, so the differences above are mostly the engine's; "
            f"what the gateway adds is measured below)"
        )
    # Per request: the client's time to first event less the engine's share the gateway logged for that request.
    paired = [(entries[rid], t) for rid, t in gate.first_event.items() if entries.get(rid, {}).get("engine_ttft_s")]
    if base.engine_requests and gate.engine_requests:
        # The client's mean time to first event less the engine's own mean TTFT: hops and client on both sides,
        # the gateway on one; the engine's pass-to-pass spread cancels out of each side.
        outside = {
            name: statistics.fmean(p.first_event.values()) - p.engine_ttft / p.engine_requests
            for name, p in merged.items()
        }
        direct, through = outside["direct to vLLM (baseline)"], outside["through the gateway"]
        print(
            f"\nmean time to first event outside the engine (client's mean less vLLM's own mean TTFT): direct "
            f"{1000 * direct:.2f} ms, through the gateway {1000 * through:.2f} ms: "
            f"the gateway adds {1000 * (through - direct):+.2f} ms on average"
        )
    added = print_per_request(paired, gate.on_wire) if paired else []
    print_goals(ratio, added)


def print_goals(ratio: float, added: list[float]) -> None:
    """The verdict on the issue's goals: the throughput ratio, and the added TTFT per request (engine taken out)."""
    print("\ngoals (added TTFT: per request from the request on the wire, the engine's share taken out)")
    checks = [("throughput >= 0.97x direct", f"{ratio:.3f}x", ratio >= 0.97)]
    if added:
        p50, p99 = statistics.median(added), pct(added, 0.99)
        checks += [
            ("added TTFT p50 <= 3 ms", f"{1000 * p50:.2f} ms", p50 <= 0.003),
            ("added TTFT p99 <= 10 ms", f"{1000 * p99:.2f} ms", p99 <= 0.010),
        ]
    for goal, value, met in checks:
        print(f"  {goal:<28} {value:>10}  {'met' if met else 'NOT MET'}")
    if not added:
        print("  added TTFT: no request was matched in the gateway's access log")


def print_per_request(paired: list[tuple[dict, float]], on_wire: dict[str, float]) -> list[float]:
    """What the gateway added to each request's time to first event, with the engine's share (logged) taken out.

    Returns the figure the goals are judged on: counted from the request on the wire where the client's trace
    gave it, else from the client's start.
    """
    from_start = [t - e["engine_ttft_s"] for e, t in paired]
    # The client's own time before its request is on the wire (building and writing it) is not the
    # gateway's: a direct request pays it too. What is left: the hop in, the gateway's work, the hop out.
    from_wire = [t - on_wire[e["request_id"]] - e["engine_ttft_s"] for e, t in paired if e["request_id"] in on_wire]
    rows = [("from the client's start (upper bound)", from_start)]
    if from_wire:
        rows.append(("from the request on the wire", from_wire))
    rows.append(("  gateway before the engine", [e["gateway_s"] for e, _ in paired]))
    sends = [e["upstream_send_s"] for e, _ in paired if e.get("upstream_send_s") is not None]
    if sends:
        rows.append(("  gateway writing it to the engine", sends))
    relayed = [e["relay_first_s"] for e, _ in paired if e.get("relay_first_s") is not None]
    if relayed:
        rows.append(("  gateway relaying the first", relayed))
    print(
        f"\nper request ({len(paired)} requests): time to first event at the client less the engine's share "
        f"(engine_ttft_s in the access log)"
    )
    print(f"{'added TTFT':<38} | {'p50':>8} | {'p90':>8} | {'p99':>8}  (ms)")
    for name, values in rows:
        print(
            f"{name:<38} | {1000 * statistics.median(values):>8.2f} | {1000 * pct(values, 0.9):>8.2f} | "
            f"{1000 * pct(values, 0.99):>8.2f}"
        )
    return from_wire or from_start


if __name__ == "__main__":
    main()
