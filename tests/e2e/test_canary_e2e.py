"""Canaries on the live gateway with real vLLM: a good candidate is promoted step by step under traffic, a
broken one is rolled back at its first analysis, and no request fails either way. Driven by `lorafleet canary`."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from contract.store import AdapterStore
from tests.conftest import FLAG_SCHEMA, ROOT, Gateway

ALIAS = "flags"


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LORAFLEET_GATEWAY_URL": gw.url, "LORAFLEET_ADMIN_KEY": gw.running.admin_key, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", "canary", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Traffic:
    """Requests from many users in a few threads until stopped; every answer that is not a 200 is kept."""

    def __init__(self, gw: Gateway, workers: int = 4) -> None:
        self.gw, self.stop = gw, threading.Event()
        self.failures: list[str] = []
        self.served: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(
            base_url=self.gw.url, timeout=120, headers={"Authorization": f"Bearer {self.gw.key}"}
        ) as http:
            while not self.stop.is_set():
                body = {
                    "model": ALIAS,
                    "max_tokens": 8,
                    "temperature": 0,
                    "user": f"user-{rng.randrange(500)}",
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Is order {rng.randrange(9999)} ready to ship? Answer with the JSON flag.",
                        }
                    ],
                }
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if resp.status_code != 200:
                    self.failures.append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    ref = resp.headers["x-lorafleet-adapter"]
                    self.served[ref] = self.served.get(ref, 0) + 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def wait_for(gw: Gateway, states: set[str], timeout: float = 240) -> dict:
    admin = {"Authorization": f"Bearer {gw.running.admin_key}"}
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{gw.url}/admin/canaries/{ALIAS}", headers=admin, timeout=30).json()
        if status["state"] in states:
            return status
        time.sleep(0.5)
    pytest.fail(f"canary still {status.get('state')} after {timeout} s: {status}")


@pytest.fixture(scope="module")
def flags(e2e_gateway: Gateway, flag_adapters: dict[str, Path]) -> Gateway:
    """Alias "flags": v1 good (stable), v2 good retrained, v3 broken; JSON checked against the flag schema."""
    gw = e2e_gateway.ensure_running()
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.running.admin_key}"}, timeout=120)
    store = AdapterStore(gw.running.data_dir / "adapters")
    for name in ("good", "good2", "broken"):
        shutil.copytree(flag_adapters[name], gw.running.data_dir / "runs" / f"flags-{name}")
        published = admin.post(f"/admin/adapters/{ALIAS}/versions", json={"path": f"flags-{name}"})
        assert published.status_code == 201, published.text
    for version in (1, 2):  # as `lorafleet eval --gate` would record; v3 never passed a gate
        store.record_gate(store.get(ALIAS, version), {"passed": True})
    assert admin.post(f"/admin/adapters/{ALIAS}/promote", json={"version": 1}).status_code == 200
    policy = admin.put(f"/admin/aliases/{ALIAS}/policy", json={"json_mode": "validate", "default_schema": FLAG_SCHEMA})
    assert policy.status_code == 200, policy.text
    assert admin.put(f"/admin/tenants/acme/grants/{ALIAS}").status_code == 200
    return gw


def test_a_good_candidate_is_promoted_through_every_step(flags: Gateway) -> None:
    with Traffic(flags) as traffic:
        started = cli(
            flags,
            "start",
            ALIAS,
            "--version",
            "2",
            "--steps",
            "34,67,100",
            "--interval",
            "2",
            "--min-samples",
            "6",
            "--max-latency-ratio",
            "3",
            "--confidence",
            "0.99",
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert "candidate v2 vs stable v1, running, step 1/3" in started.stdout
        final = wait_for(flags, {"promoted", "rolled_back"})
    assert final["state"] == "promoted", final
    assert traffic.failures == []
    assert traffic.served.get(f"{ALIAS}@2", 0) > 0 and traffic.served.get(f"{ALIAS}@1", 0) > 0
    events = cli(flags, "events", ALIAS)
    actions = [line.split()[3] for line in events.stdout.splitlines()]
    assert actions[0] == "start" and actions[-1] == "promote" and actions.count("step") == 1, events.stdout  # 34->67
    store = AdapterStore(flags.running.data_dir / "adapters")
    assert store.stable(ALIAS).version == 2 and store.is_retired(store.get(ALIAS, 1))


def test_a_broken_candidate_is_rolled_back_and_stable_keeps_serving(flags: Gateway) -> None:
    with Traffic(flags) as traffic:
        started = cli(
            flags,
            "start",
            ALIAS,
            "--version",
            "3",
            "--steps",
            "50,100",
            "--interval",
            "2",
            "--min-samples",
            "6",
            "--max-latency-ratio",
            "3",
            "--force",
            "--reason",
            "drill",
        )
        assert started.returncode == 0, started.stdout + started.stderr
        final = wait_for(flags, {"promoted", "rolled_back"})
    assert final["state"] == "rolled_back", final
    assert traffic.failures == []
    validity = next(m for m in final["last_analysis"]["metrics"] if m["metric"] == "json_validity")
    assert validity["regression"] and validity["canary"] < validity["stable"]
    status = cli(flags, "status", ALIAS)
    assert "rolled_back" in status.stdout and "REGRESSION" in status.stdout, status.stdout
    actions = [line.split()[3] for line in cli(flags, "events", ALIAS).stdout.splitlines()]
    assert actions[-1] == "rollback" and actions[-2] in ("start", "wait")  # at its first judged analysis
    with httpx.Client(base_url=flags.url, headers={"Authorization": f"Bearer {flags.key}"}, timeout=120) as http:
        refs = {
            http.post(
                "/v1/chat/completions",
                json={
                    "model": ALIAS,
                    "max_tokens": 8,
                    "user": f"user-{i}",
                    "messages": [{"role": "user", "content": "Is order 5 ready?"}],
                },
            ).headers["x-lorafleet-adapter"]
            for i in range(0, 500, 25)
        }
    assert refs == {f"{ALIAS}@2"}  # after the rollback, stable serves every user
    store = AdapterStore(flags.running.data_dir / "adapters")
    assert store.stable(ALIAS).version == 2 and store.is_retired(store.get(ALIAS, 3))


def test_bad_canary_requests_are_clear_cli_errors(flags: Gateway) -> None:
    for args, message in [
        (("start", ALIAS, "--version", "99"), "404: no version 99"),
        (("start", ALIAS, "--version", "1"), "is retired"),
        (("start", ALIAS, "--version", "2"), "already the stable version"),
        (("start", ALIAS, "--version", "3", "--steps", "50,10"), "steps must be rising"),
        (("pause", ALIAS), "has no canary running"),
        (("start", "nope", "--version", "1"), "no alias 'nope'"),
    ]:
        result = cli(flags, *args)
        assert result.returncode != 0 and message in result.stdout + result.stderr, (args, result.stdout)
