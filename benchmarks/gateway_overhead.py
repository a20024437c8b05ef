"""What the gateway costs on top of vLLM: the same LoRA requests, straight to the engine vs through the gateway.

    python -m benchmarks.gateway_overhead [--requests 16] [--rounds 2] [--concurrency 1 8] [--max-tokens 32]

Baseline: requests sent directly to the vLLM server the gateway supervises,
naming the loaded adapter (``orders@1``). Candidate: the same requests through
the gateway with a tenant key and the alias (``orders``), which adds auth,
alias resolution, the recorded chat template and the proxy hop. Both run in
this process against the same engine, interleaved per round so machine noise
hits both alike. Prints medians and the gateway/direct ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from contract.settings import CommonSettings
from contract.store import AdapterStore
from lorafleet.launch import start_gateway
from serving.tenants import TenantStore

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line)["instruction"] for line in (ROOT / "data/orders/test.jsonl").read_text().splitlines()]


def adapter_dir(settings: CommonSettings, work: Path) -> Path:
    """The published demo adapter, else a tiny one trained now: speed does not depend on quality."""
    latest = AdapterStore(settings.adapters_dir).latest("orders")
    if latest is not None:
        return latest.path
    import subprocess
    import sys

    out = work / "orders"
    subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", "--data", str(ROOT / "data/orders/train.jsonl"), "--out", str(out),
         "--task", "orders", "--max-steps", "4", "--batch-size", "4"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    return out


async def timed(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str, prompt: str,
                max_tokens: int, chat_template: str | None) -> tuple[float, int]:  # fmt: skip
    body: dict = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                  "max_tokens": max_tokens, "ignore_eos": True}  # fmt: skip
    if chat_template is not None:
        body["chat_template"] = chat_template
    started = time.perf_counter()
    resp = await client.post(url, json=body, headers=headers)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, int(resp.json()["usage"]["completion_tokens"])


async def run_round(target: dict, n: int, concurrency: int, max_tokens: int) -> tuple[list[float], float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> tuple[float, int]:
            async with sem:
                return await timed(client, target["url"], target["headers"], target["model"], PROMPTS[i % len(PROMPTS)],
                                   max_tokens, target["chat_template"])  # fmt: skip

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - started
    return [r[0] for r in results], sum(r[1] for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    settings = CommonSettings()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = adapter_dir(settings, work)
        AdapterStore(work / "adapters").publish(source, "orders")
        tenants = TenantStore(f"sqlite:///{work / 'state.db'}")
        tenant = tenants.create("bench")
        tenants.grant(tenant, "orders")
        key = tenants.issue_key(tenant)
        template = json.loads((source / "lorafleet.json").read_text())["prompt_format"]["chat_template"]
        gw = start_gateway(work, Path(settings.base_model_path()))
        try:
            targets = {
                "direct vLLM (baseline)": {"url": f"{gw.engine_url}/v1/chat/completions", "headers": {},
                                           "model": "orders@1", "chat_template": template},
                "through gateway": {"url": f"{gw.url}/v1/chat/completions",
                                    "headers": {"Authorization": f"Bearer {key}"}, "model": "orders",
                                    "chat_template": None},
            }  # fmt: skip
            asyncio.run(run_round(targets["through gateway"], 4, 4, 8))  # warm-up: compile paths, caches
            rows = []
            for conc in args.concurrency:
                lat: dict[str, list[float]] = {name: [] for name in targets}
                tps: dict[str, list[float]] = {name: [] for name in targets}
                for _ in range(args.rounds):
                    for name, target in targets.items():
                        latencies, tokens_per_s = asyncio.run(run_round(target, args.requests, conc, args.max_tokens))
                        lat[name] += latencies
                        tps[name].append(tokens_per_s)
                base = "direct vLLM (baseline)"
                for name in targets:
                    med, base_med = statistics.median(lat[name]), statistics.median(lat[base])
                    p95 = statistics.quantiles(lat[name], n=20)[-1]
                    rate = statistics.median(tps[name])
                    rows.append(
                        (conc, name, med * 1000, p95 * 1000, med / base_med, rate, rate / statistics.median(tps[base]))
                    )
        finally:
            gw.stop()

    print(f"\ngateway overhead: {args.requests} requests x {args.rounds} rounds, {args.max_tokens} output tokens, "
          f"LoRA adapter orders@1 on {Path(settings.base_model_path()).name}")  # fmt: skip
    print(f"{'concurrency':>11} | {'target':<24} | {'median ms':>9} | {'p95 ms':>8} | {'x baseline':>10} | "
          f"{'tokens/s':>8} | {'x baseline':>10}")  # fmt: skip
    print("-" * 100)
    for conc, name, med, p95, ratio, rate, rate_ratio in rows:
        print(
            f"{conc:>11} | {name:<24} | {med:>9.1f} | {p95:>8.1f} | {ratio:>10.3f} | {rate:>8.1f} | {rate_ratio:>10.3f}"
        )


if __name__ == "__main__":
    main()
