"""How long a first run takes to answer: seconds from ``lorafleet demo`` (what ``make run`` runs) to the first 200.

    python -m benchmarks.first_answer                    # a fresh data dir under var/first-answer
    python -m benchmarks.first_answer --until toolcall   # also wait for the toolcall adapter

Starts the demo on a fresh data directory (so the base model is pulled and
converted, and the demo adapters are trained, as on a new machine with the
virtual environment already installed), and polls the gateway with the demo
tenant's key: ``base`` until it answers 200, then each demo alias (503 with the
training ETA until its adapter is published and hot-loaded). Prints one row per
milestone, then stops the demo with SIGINT as Ctrl-C would, and checks that it
stops cleanly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lorafleet.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "first-answer")
    parser.add_argument("--until", choices=["orders", "toolcall"], default="orders")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    shutil.rmtree(args.data_dir, ignore_errors=True)
    args.data_dir.mkdir(parents=True)
    port = free_port()
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(args.data_dir),
        "LORAFLEET_PORT": str(port),
        "LORAFLEET_ENGINE_PORT": str(free_port()),
    }
    env.pop("LORAFLEET_ADMIN_KEY", None)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    log = (args.data_dir / "demo.out").open("wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "demo"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    rows: list[tuple[str, float, str]] = []
    try:
        key = _wait_for_key(args.data_dir / "demo-keys" / "orders.key", demo, started + args.timeout)
        rows.append(("demo tenant key written (model pulled)", time.monotonic() - started, ""))
        aliases = ["base", "orders"] + (["toolcall"] if args.until == "toolcall" else [])
        for alias in aliases:
            note = _first_200(
                url,
                key if alias != "toolcall" else _key(args.data_dir, "toolcall"),
                alias,
                demo,
                started + args.timeout,
            )
            rows.append((f"first 200 from '{alias}'", time.monotonic() - started, note))
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=180)
        except subprocess.TimeoutExpired:
            demo.kill()
            code = demo.wait()
        rows.append(("stopped by SIGINT", time.monotonic() - started, f"exit code {code}"))
        log.close()
    print("\n| milestone | seconds from `lorafleet demo` | note |\n|---|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.0f} | {note} |")
    print(f"\ndemo output: {args.data_dir / 'demo.out'}; gateway log: {args.data_dir / 'logs' / 'gateway.log'}")


def _key(data_dir: Path, tenant: str) -> str:
    return (data_dir / "demo-keys" / f"{tenant}.key").read_text().strip()


def _wait_for_key(path: Path, demo: subprocess.Popen[bytes], deadline: float) -> str:
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"the demo exited with code {demo.returncode}")
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.5)
    raise SystemExit("timed out waiting for the demo's tenant key")


def _first_200(url: str, key: str, alias: str, demo: subprocess.Popen[bytes], deadline: float) -> str:
    """Poll until ``alias`` answers 200; the note is the first 503's message (the training ETA), if any."""
    body = {"model": alias, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    first_refusal = ""
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"the demo exited with code {demo.returncode}")
        try:
            resp = httpx.post(
                f"{url}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"}
            )
        except httpx.HTTPError:
            time.sleep(1)
            continue
        if resp.status_code == 200:
            return first_refusal
        if resp.status_code == 503 and not first_refusal and resp.json()["error"]["code"] == "model_training":
            first_refusal = f"503 before: {resp.json()['error']['message']} (Retry-After {resp.headers['retry-after']})"
        time.sleep(1)
    raise SystemExit(f"timed out waiting for '{alias}'")


if __name__ == "__main__":
    main()
