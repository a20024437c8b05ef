"""Steady traffic from many users to a running gateway: for canary walkthroughs and filling dashboards.

    python -m benchmarks.traffic --alias orders --key-file var/demo-keys/orders.key [--workers 4] [--users 200]

Each worker sends the held-out prompts of ``--data`` in a loop as a random one
of ``--users`` users (the request's ``user`` field, which canary assignment is
sticky on), and every ``--every`` seconds a line says how many answers each
version gave and how many requests failed. Ctrl-C (or ``--duration``) stops it.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument("--alias", required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT / "data/orders/test.jsonl", help="prompts (instruction rows)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0 runs until Ctrl-C")
    parser.add_argument("--every", type=float, default=10)
    args = parser.parse_args()

    key = args.key_file.read_text().strip()
    prompts = [json.loads(line)["instruction"] for line in args.data.read_text().splitlines() if line.strip()]
    served: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=args.gateway, timeout=300, headers={"Authorization": f"Bearer {key}"}) as http:
            while not stop.is_set():
                body = {
                    "model": args.alias,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "user": f"user-{rng.randrange(args.users)}",
                    "messages": [{"role": "user", "content": rng.choice(prompts)}],
                }
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] += 1
                    continue
                if resp.status_code == 200:
                    served[f"{resp.headers['x-lorafleet-adapter']} {resp.headers.get('x-lorafleet-json', '-')}"] += 1
                else:
                    failures[str(resp.status_code)] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.workers)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        while not args.duration or time.monotonic() - started < args.duration:
            time.sleep(args.every)
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(served.items())) or "none yet"
            print(
                f"[{time.monotonic() - started:5.0f} s] answers by version and JSON outcome: {answers}; "
                f"failed: {sum(failures.values())} {dict(failures) if failures else ''}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    stop.set()


if __name__ == "__main__":
    main()
