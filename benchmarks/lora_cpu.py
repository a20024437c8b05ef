"""LoRA on the CPU engine against the base model: vLLM's own LoRA ops, then lorafleet's grouped ops (the plugin).

    python -m benchmarks.lora_cpu [--requests 32] [--concurrency 8] [--max-tokens 64] [--rounds 2]

One vLLM engine at a time, started as the gateway starts its child, with four
adapter slots: first with ``LORAFLEET_LORA_OPS=vllm`` (vLLM's torch ops), then
with ``grouped`` (lorafleet_vllm, the default). On each, four adapters are
loaded (copies of the served ``orders`` adapter, else a tiny one trained here:
speed does not depend on the weights' values), then the same closed-loop
workload is sent to three targets: the bare base model (the baseline, measured
on the same engine), one adapter, and the four adapters mixed round-robin in
one batch. ``--requests`` streamed chat completions per target and round,
``--concurrency`` at a time, exactly ``--max-tokens`` output tokens each
(``ignore_eos``); the targets alternate over ``--rounds`` so machine noise
hits them alike, after one warm-up request each.

Printed: per engine and target, output tokens/s, TTFT p50/p99 and the ratio
of tokens/s to the base model's on the same engine. Goals (grouped): one
adapter >= 0.8x the base model, four mixed >= 0.7x.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

import httpx

from benchmarks.fleet_routing import closed_loop, rate
from benchmarks.gateway_overhead import Pass, adapter_dir
from benchmarks.wire_timing import pct
from contract.settings import CommonSettings
from lorafleet.launch import RunningEngine, start_engine

TARGETS = {"base model": ["base"], "one adapter": ["a0"], "four adapters mixed": ["a0", "a1", "a2", "a3"]}
OPS = {"vllm": "vLLM's torch ops", "grouped": "lorafleet's grouped ops"}


def load_adapters(engine: RunningEngine, source: Path, work: Path) -> None:
    headers = {"Authorization": f"Bearer {engine.key}"}
    for k in range(4):
        path = work / f"a{k}"
        if not path.exists():
            shutil.copytree(source, path)
        httpx.post(
            f"{engine.url}/v1/load_lora_adapter",
            json={"lora_name": f"a{k}", "lora_path": str(path)},
            headers=headers,
            timeout=120,
        ).raise_for_status()


def measure(args: argparse.Namespace, ops: str, base: Path, source: Path, work: Path) -> dict[str, Pass]:
    """Every target on one engine running ``ops``, alternating over the rounds."""
    engine = start_engine(work / f"engine-{ops}", base, max_loras="4", kv_cache_gib="1", lora_ops=ops)
    totals = {name: Pass() for name in TARGETS}
    try:
        load_adapters(engine, source, work)
        for models in TARGETS.values():  # warm-up: first requests, adapters into their slots
            asyncio.run(closed_loop(engine.url, engine.key, models, len(models), len(models), 4))
        for _ in range(args.rounds):
            for name, models in TARGETS.items():
                run = closed_loop(engine.url, engine.key, models, args.requests, args.concurrency, args.max_tokens)
                p = asyncio.run(run)
                into = totals[name]
                into.ttft += p.ttft
                into.tokens += p.tokens
                into.wall += p.wall
                print(f"{OPS[ops]}, {name}: {rate(p):.1f} tokens/s", flush=True)
    finally:
        engine.stop()
    return totals


def report(args: argparse.Namespace, results: dict[str, dict[str, Pass]]) -> None:
    print(
        f"\nOne CPU engine, 4 adapter slots, rank of the served adapter; {args.requests} streamed requests per "
        f"target and round, {args.concurrency} at a time, {args.max_tokens} tokens each, {args.rounds} rounds; "
        "baseline: the base model on the same engine"
    )
    print(f"{'LoRA ops':<24} {'target':<20} {'tokens/s':>9} {'x base':>7} {'TTFT p50':>9} {'TTFT p99':>9}")
    for ops, totals in results.items():
        baseline = rate(totals["base model"])
        for name, p in totals.items():
            print(
                f"{OPS[ops]:<24} {name:<20} {rate(p):>9.1f} {rate(p) / baseline:>7.2f} "
                f"{statistics.median(p.ttft):>8.2f}s {pct(p.ttft, 0.99):>8.2f}s"
            )
    if "grouped" in results:
        grouped = results["grouped"]
        baseline = rate(grouped["base model"])
        one_ratio = rate(grouped["one adapter"]) / baseline
        mixed_ratio = rate(grouped["four adapters mixed"]) / baseline
        print(
            f"goal: one adapter >= 0.8x base: {'met' if one_ratio >= 0.8 else 'NOT met'} ({one_ratio:.2f}x); "
            f"four mixed >= 0.7x: {'met' if mixed_ratio >= 0.7 else 'NOT met'} ({mixed_ratio:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="per target and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ops", action="append", choices=list(OPS), help="default: both, vllm first")
    args = parser.parse_args()
    settings = CommonSettings()
    base = Path(settings.base_model_path())
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-lora-cpu-"))
    source = adapter_dir(settings, work)
    results = {ops: measure(args, ops, base, source, work) for ops in args.ops or list(OPS)}
    report(args, results)


if __name__ == "__main__":
    main()
