"""Affinity routing against round-robin and random over the same two engines, and the merged fast path.

    python -m benchmarks.fleet_routing [--requests 96] [--rate 4] [--max-tokens 32] [--aliases 8] [--max-loras 4]

Two vLLM engines (started here as the gateway starts its children, each with
``--max-loras``), one gateway per policy in turn over both (``LORAFLEET_ROUTE_POLICY``:
``affinity``, the default, then the baselines ``round_robin`` and ``random``),
the same request sequence for each: ``--requests`` streamed chat completions
arriving open-loop at ``--rate`` per second (Poisson), ``--max-tokens`` output
tokens each (``ignore_eos``), over ``--aliases`` adapters with Zipf-like
popularity (the k-th alias weighs 1/k^``--zipf``). Before each policy both
engines unload every adapter, so each starts cold.

The regime is chosen so that placement matters: 8 aliases on 2 engines with 4
slots each fit the fleet exactly when each adapter lives on one engine, and
under round-robin each engine's batch wants more distinct adapters than its 4
slots (vLLM makes the rest wait, and the gateway swaps idle ones in and out).
The offered load is above what the two engines serve on a 2-core CPU, so the
throughput measured is capacity, not the arrival rate.

Then the merged fast path: alias ``a0``'s adapter merged into the base model
(``lorafleet export --merge``) on a third engine bound to ``a0@1``, and one
closed-loop workload (``--concurrency`` streams) three times, one after the
other: the bare base model, ``a0`` (routed to the merged engine), and ``a1``
(the same adapter weights on the LoRA path).

Printed: per policy, output tokens/s, TTFT p50/p99, adapter loads and
evictions (the gateway's counters), and the ratios against round-robin; then
the merged path's tokens/s against the base model's. Goals: affinity >= 1.3x
round-robin's throughput with <= 1/4 of its loads; merged >= 0.9x base.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.gateway_overhead import PROMPTS, Pass, adapter_dir, one
from benchmarks.wire_timing import pct
from contract.settings import CommonSettings
from contract.store import AdapterStore
from lorafleet.launch import RunningEngine, RunningGateway, start_engine, start_gateway
from serving.state.tenants import TenantStore

POLICIES = ["affinity", "round_robin", "random"]
CHAT = "/v1/chat/completions"


def workload(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """The aliases of the requests, in order, and the gaps between their arrivals: the same for every policy."""
    rng = random.Random(args.seed)
    names = [f"a{k}" for k in range(args.aliases)]
    weights = [1 / (k + 1) ** args.zipf for k in range(args.aliases)]
    return rng.choices(names, weights, k=args.requests), [rng.expovariate(args.rate) for _ in range(args.requests)]


async def open_loop(url: str, key: str, aliases: list[str], gaps: list[float], max_tokens: int) -> Pass:
    result = Pass()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=256)) as client:
        started = time.perf_counter()
        tasks = []
        for i, (alias, gap) in enumerate(zip(aliases, gaps, strict=True)):
            tasks.append(asyncio.create_task(one(client, url + CHAT, headers, body(alias, i, max_tokens), result)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks)
        result.wall = time.perf_counter() - started
    return result


async def closed_loop(url: str, key: str, alias: str | list[str], n: int, concurrency: int, max_tokens: int) -> Pass:
    """``n`` streamed requests, ``concurrency`` in flight; several aliases take turns (the i-th request to the
    i-th modulo their number)."""
    aliases = [alias] if isinstance(alias, str) else alias
    result = Pass()
    headers = {"Authorization": f"Bearer {key}"}
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900) as client:

        async def send(i: int) -> None:
            async with slots:
                await one(client, url + CHAT, headers, body(aliases[i % len(aliases)], i, max_tokens), result)

        started = time.perf_counter()
        await asyncio.gather(*(send(i) for i in range(n)))
        result.wall = time.perf_counter() - started
    return result


def body(alias: str, i: int, max_tokens: int) -> dict:
    return {
        "model": alias,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def unload_all(engine: RunningEngine) -> None:
    """Every runtime-loaded adapter off ``engine``: the next policy starts cold."""
    headers = {"Authorization": f"Bearer {engine.key}"}
    models = httpx.get(f"{engine.url}/v1/models", headers=headers, timeout=30).json()["data"]
    for model in models:
        if model["id"] != "base":
            httpx.post(
                f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": model["id"]}, headers=headers, timeout=30
            ).raise_for_status()


def gateway(
    work: Path,
    base: Path,
    source: Path,
    aliases: list[str],
    engines: dict[str, RunningEngine],
    policy: str,
    max_loras: int,
    merged: dict[str, tuple[Path, str]] | None = None,
) -> tuple[RunningGateway, str]:
    """A gateway over ``engines`` (external, with their keys) routing by ``policy``; the tenant key."""
    work.mkdir(parents=True)
    store = AdapterStore(work / "adapters")
    tenants = TenantStore(f"sqlite:///{work / 'state.db'}")
    tenant = tenants.create("bench")
    for alias in [*aliases, "base"]:
        if alias != "base":
            store.publish(source, alias)
        tenants.grant(tenant, alias)
    lines = ["engines:"]
    for name, engine in engines.items():
        lines += [
            f"  - name: {name}",
            f"    url: {engine.url}",
            f"    key: {engine.key}",
            f"    max_loras: {max_loras}",
        ]
        if merged and name in merged:
            lines += [f"    base: {merged[name][0]}", f"    merged: {merged[name][1]}"]
    (work / "engines.yaml").write_text("\n".join(lines) + "\n")
    gw = start_gateway(
        work,
        base,
        engines_file=str(work / "engines.yaml"),
        route_policy=policy,
        max_loras=str(max_loras),
        state_cache_s="60",
    )
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    deadline = time.monotonic() + 120
    while not all(e["healthy"] for e in httpx.get(f"{gw.url}/admin/engines", headers=admin).json()["data"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engines did not all come into routing:\n{gw.log_tail()}")
        time.sleep(0.5)
    return gw, tenants.issue_key(tenant)


def counters(gw: RunningGateway) -> dict[str, float]:
    out = {"loads": 0.0, "evictions": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{gw.url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "lorafleet_adapter_loads_total" and sample.labels.get("outcome") == "success":
                out["loads"] += sample.value
            if sample.name == "lorafleet_fleet_adapter_unloads_total" and sample.labels.get("cause") == "evicted":
                out["evictions"] += sample.value
    return out


def rate(p: Pass) -> float:
    return p.tokens / p.wall if p.wall else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--aliases", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent: the k-th alias weighs 1/k^s")
    parser.add_argument("--max-loras", type=int, default=4, help="adapter slots per engine")
    parser.add_argument("--concurrency", type=int, default=8, help="streams in the merged-path comparison")
    parser.add_argument("--merged-requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-merged", action="store_true", help="skip the merged fast path's comparison")
    args = parser.parse_args()

    settings = CommonSettings()
    base = Path(settings.base_model_path())
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-fleet-"))
    source = adapter_dir(settings, work)
    aliases, gaps = workload(args)
    names = [f"a{k}" for k in range(args.aliases)]
    print(
        f"{args.requests} requests at {args.rate}/s over {args.aliases} aliases (Zipf {args.zipf}): "
        + ", ".join(f"{n} {aliases.count(n)}" for n in names)
    )
    # One core each (VLLM_CPU_OMP_THREADS_BIND), as engines sharing a machine should run: on a 2-core machine two
    # engines on every core fight over both.
    engines = {
        name: start_engine(work / name, base, max_loras=str(args.max_loras), kv_cache_gib="1", cpus=str(i))
        for i, name in enumerate(("e1", "e2"))
    }
    results: dict[str, tuple[Pass, dict[str, float]]] = {}
    merged_rows: dict[str, Pass] = {}
    try:
        for policy in POLICIES:
            for engine in engines.values():
                unload_all(engine)
            gw, key = gateway(work / f"gw-{policy}", base, source, names, engines, policy, args.max_loras)
            try:
                result = asyncio.run(open_loop(gw.url, key, aliases, gaps, args.max_tokens))
                results[policy] = (result, counters(gw))
            finally:
                gw.stop()
            print(f"{policy}: {rate(result):.1f} tokens/s, {results[policy][1]}", flush=True)

        if not args.no_merged:
            merged_rows = merged_path(args, work, base, source, names, engines)
    finally:
        for engine in engines.values():
            engine.stop()
    report(args, results, merged_rows)


def merged_path(
    args: argparse.Namespace, work: Path, base: Path, source: Path, names: list[str], engines: dict[str, RunningEngine]
) -> dict[str, Pass]:
    """The bare base model, ``a0`` on an engine serving it merged, and the same weights on the LoRA path."""
    from training.export import merge

    rows: dict[str, Pass] = {}
    for engine in engines.values():
        unload_all(engine)
    merged_dir = work / "a0-merged"
    merge(source, merged_dir, str(base))
    fast = start_engine(work / "fast", merged_dir, max_loras="1", kv_cache_gib="1", cpus="1")
    try:
        gw, key = gateway(
            work / "gw-merged",
            base,
            source,
            names,
            {"e1": engines["e1"], "fast": fast},
            "affinity",
            args.max_loras,
            merged={"fast": (merged_dir, "a0@1")},
        )
        try:
            for label, alias in (("base model", "base"), ("a0 merged", "a0"), ("a0's weights as LoRA", "a1")):
                rows[label] = asyncio.run(
                    closed_loop(gw.url, key, alias, args.merged_requests, args.concurrency, args.max_tokens)
                )
                print(f"{label}: {rate(rows[label]):.1f} tokens/s", flush=True)
        finally:
            gw.stop()
    finally:
        fast.stop()
    return rows


def report(
    args: argparse.Namespace, results: dict[str, tuple[Pass, dict[str, float]]], merged: dict[str, Pass]
) -> None:
    rr, rr_counts = results["round_robin"]
    print(
        f"\nTwo engines, {args.max_loras} adapter slots each; {args.requests} requests, {args.max_tokens} tokens "
        f"each, open loop at {args.rate}/s; baseline: round_robin (same engines, same sequence)"
    )
    print(
        f"{'policy':<12} {'tokens/s':>9} {'x rr':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'loads':>6} {'x rr':>6} "
        f"{'evictions':>9}"
    )
    for policy, (p, counts) in results.items():
        load_ratio = counts["loads"] / rr_counts["loads"] if rr_counts["loads"] else float("nan")
        print(
            f"{policy:<12} {rate(p):>9.1f} {rate(p) / rate(rr):>6.2f} {statistics.median(p.ttft):>8.2f}s "
            f"{pct(p.ttft, 0.99):>8.2f}s {counts['loads']:>6.0f} {load_ratio:>6.2f} "
            f"{counts['evictions']:>9.0f}"
        )
    affinity, aff_counts = results["affinity"]
    throughput_ok = rate(affinity) >= 1.3 * rate(rr)
    loads_ok = aff_counts["loads"] <= rr_counts["loads"] / 4
    print(
        f"goal: affinity >= 1.3x round_robin tokens/s: {'met' if throughput_ok else 'NOT met'} "
        f"({rate(affinity) / rate(rr):.2f}x); loads <= 1/4: {'met' if loads_ok else 'NOT met'}"
    )
    if merged:
        baseline = rate(merged["base model"])
        print(
            f"\nMerged fast path: {args.merged_requests} requests, {args.concurrency} at a time, one engine each; "
            "baseline: the bare base model"
        )
        print(f"{'served as':<22} {'tokens/s':>9} {'x base':>7} {'TTFT p50':>9}")
        for label, p in merged.items():
            print(f"{label:<22} {rate(p):>9.1f} {rate(p) / baseline:>7.2f} {statistics.median(p.ttft):>8.2f}s")
        ratio = rate(merged["a0 merged"]) / baseline
        print(f"goal: merged >= 0.9x the base model: {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
