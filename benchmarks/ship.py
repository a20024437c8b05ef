"""Where the time goes when new data is shipped to production: `lorafleet ship` phase by phase.

    python -m benchmarks.ship                     # make bench-ship
    python -m benchmarks.ship --steps 20 --rows 200

A gateway and a worker on a fresh data folder; the demo's orders data; two
ships into one alias, each timed by ``lorafleet ship --watch --timings`` (the
phases as the watch saw them, every half second):

1. the alias's **first** version: validation, queue, training, gate (against the
   base model), promotion;
2. the **next** version: the same, then a canary (25% then 100%) under users
   sending the held-out prompts (``benchmarks.traffic``'s loop, two workers).

The alias's gate is set to let the short trainings through (the verdict is
still computed, on 32 held-out rows): what is timed is the path, not the
quality. For each: the seconds of each phase, the whole, and the share that is *not*
training, gating or the canary waiting for its samples (validation, queueing,
starting the canary or promoting). Goal: that share ≤ 5% of the whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from lorafleet.launch import start_gateway

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ROOT / "data" / "orders"
ALIAS = "orders-ship"
WORK = ("training", "gate", "canary")  # the phases that are the work itself (or waiting for its samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "bench-ship")
    parser.add_argument("--base-model", type=Path, default=ROOT / "var" / "models" / "SmolLM2-135M-Instruct")
    args = parser.parse_args()
    shutil.rmtree(args.data_dir, ignore_errors=True)
    (args.data_dir / "gw").mkdir(parents=True)
    data = args.data_dir / "train.jsonl"
    data.write_text("\n".join((ORDERS / "train.jsonl").read_text().splitlines()[: args.rows]) + "\n")
    held = args.data_dir / "held.jsonl"
    held.write_text("\n".join((ORDERS / "validation.jsonl").read_text().splitlines()[:32]) + "\n")
    key = _tenant(args.data_dir / "gw")
    (args.data_dir / "tenant.key").write_text(key + "\n")
    gateway = start_gateway(args.data_dir / "gw", args.base_model, worker=True)
    try:
        admin = {"Authorization": f"Bearer {gateway.admin_key}"}
        # What is timed is the path, not the quality: the gate lets a 30-step version through (its verdict is
        # still computed and shown), the canary decides on ten requests a version.
        policy = {
            "canary": {"steps": [25, 100], "interval_s": 5, "min_samples": 10},
            "gate": {"min_valid": 0.0, "min_field_accuracy": 0.0, "max_drop": 1.0},
        }
        httpx.put(f"{gateway.url}/admin/aliases/{ALIAS}/rollout", json=policy, headers=admin, timeout=30)
        options = {"max_steps": args.steps, "max_length": 512, "save_every": args.steps, "eval_every": args.steps}
        first = _ship(args, gateway.url, data, held, options, "first")
        users = Users(gateway.url, key)
        try:
            second = _ship(args, gateway.url, data, held, options, "next")
        finally:
            users.stop.set()
    finally:
        gateway.stop()
    report({"first version (gated against the base model, promoted)": first, "next version (gate, canary)": second})


def _tenant(data_dir: Path) -> str:
    from serving.state.tenants import Limits, TenantStore

    store = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    tenant = store.enroll("bench", limits=Limits(running_jobs=1, queued_jobs=20))[0]
    store.grant(tenant, ALIAS)
    return store.issue_key(tenant)


def _ship(args: Any, url: str, data: Path, held: Path, options: dict[str, Any], name: str) -> dict[str, Any]:
    timings = args.data_dir / f"{name}.json"
    command = [sys.executable, "-m", "lorafleet", "ship", str(data), "--alias", ALIAS, "--validation", str(held)]
    command += ["--key-file", str(args.data_dir / "tenant.key"), "--watch", "--poll-s", "0.5"]
    command += ["--options", json.dumps(options), "--timings", str(timings), "--suffix", name]
    started = time.monotonic()
    done = subprocess.run(command, env=os.environ | {"LORAFLEET_GATEWAY_URL": url}, capture_output=True, text=True)
    wall = time.monotonic() - started
    (args.data_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"ship {name} ended {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(timings.read_text()) | {"wall": wall}


class Users:
    """Two workers sending the held-out orders prompts to the alias as many users, until stopped."""

    def __init__(self, url: str, key: str) -> None:
        rows = (ORDERS / "test.jsonl").read_text().splitlines()
        self.prompts = [json.loads(line)["instruction"] for line in rows if line.strip()]
        self.url, self.key, self.stop = url, key, threading.Event()
        for n in range(2):
            threading.Thread(target=self._send, args=(n,), daemon=True).start()

    def _send(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {
                "model": ALIAS,
                "messages": [{"role": "user", "content": self.prompts[(n * 7919 + i) % len(self.prompts)]}],
                "max_tokens": 96,
                "user": f"user-{n}-{i}",
            }
            try:
                headers = {"Authorization": f"Bearer {self.key}"}
                httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
            except httpx.HTTPError:
                time.sleep(1)


def report(runs: dict[str, dict[str, Any]]) -> None:
    phases = ["validation", "queue", "training", "gate", "rollout start", "canary", "done"]
    print("| ship | " + " | ".join(phases[:-1]) + " | whole s | not work | goal ≤ 5% |")
    print("|---|" + "---:|" * (len(phases) + 2))
    for name, run in runs.items():
        seen = run["phases"]
        whole = sum(v for k, v in seen.items() if k != "done")
        overhead = whole - sum(seen.get(k, 0.0) for k in WORK)
        cells = [f"{seen.get(p, 0.0):.1f}" for p in phases[:-1]]
        share = overhead / whole if whole else 0.0
        verdict = "yes" if share <= 0.05 else "no"
        print(f"| {name} | " + " | ".join(cells) + f" | {whole:.1f} | {overhead:.1f} s ({share:.1%}) | {verdict} |")
    print(
        "\nphases as `lorafleet ship --watch` saw them (every 0.5 s); 'not work' = validation + queue + rollout start "
        "(publishing, starting the canary or promoting)"
    )


if __name__ == "__main__":
    main()
