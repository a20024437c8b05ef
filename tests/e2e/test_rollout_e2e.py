"""From new data to the version that serves, with `lorafleet ship --watch` against the live gateway (real vLLM),
a real worker training SmolLM2 and gating on in-process vLLM, and simulated users: the three endings, each with
its exit status.

The task is the canary tests' flag (``{"ok": true}``): a dozen steps teach it (or, for the broken data, teach
``{"ok": tru``), so each job is quick and its outcome unmistakable. The module runs in order, on one alias:

1. the alias's first version: gated against the base model, promoted at once (exit 0);
2. the next version: gated against it, canaried under traffic, the gateway restarted in the middle (exit 0);
3. a deliberately broken training set: the gate fails, no canary starts (exit 4);
4. the same broken data with the gate loosened by the admin: the canary sees the JSON break and rolls back (exit 5).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafleet.launch import start_gateway
from tests.conftest import FLAG_SCHEMA, Gateway, client
from tests.e2e.test_fine_tuning_e2e import WorkerProcess

pytestmark = pytest.mark.e2e

ALIAS = "flagship"
POLICY = {
    "canary": {"steps": [50, 100], "interval_s": 2, "min_samples": 6},
    "gate": {"min_valid": 0.9, "min_field_accuracy": 0.9, "max_drop": 0.05},
}
RECIPE = {"max_steps": 12, "max_length": 64, "rank": 8, "log_every": 4, "eval_every": 6, "save_every": 6}


@dataclass
class Ship:
    gateway: Gateway
    admin: httpx.Client
    data: dict[str, Path]
    key_file: Path
    worker: WorkerProcess

    def run(self, data: str, *, seed: int) -> subprocess.CompletedProcess[str]:
        """``lorafleet ship DATA --alias flagship --watch`` as a tenant anywhere would run it."""
        options = json.dumps(RECIPE | {"schema": FLAG_SCHEMA})
        command = [sys.executable, "-m", "lorafleet", "ship", str(self.data[data]), "--alias", ALIAS]
        command += ["--validation", str(self.data["held"]), "--key-file", str(self.key_file), "--watch"]
        command += ["--options", options, "--suffix", f"{data}-{seed}", "--poll-s", "0.5"]
        env = os.environ | {"LORAFLEET_GATEWAY_URL": self.gateway.url, "COLUMNS": "160"}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    def until_canary(self, data: str, *, seed: int) -> tuple[concurrent.futures.Future, Any]:
        """``run`` in the background, returned once its job's canary has started: (the run, the job)."""
        before = _job(self).id
        run = concurrent.futures.ThreadPoolExecutor(1).submit(self.run, data, seed=seed)
        deadline = time.monotonic() + 400
        while True:
            job = _job(self)
            if job.id != before and job.status == "succeeded" and _rollout(job)["state"] != "canary_pending":
                return run, job
            assert not run.done(), run.result().stdout + run.result().stderr
            assert job.id == before or job.status not in ("failed", "cancelled"), job.error
            assert time.monotonic() < deadline, f"no canary yet: {job.id} {job.status}"
            time.sleep(1)


class Users:
    """Simulated users of the alias: two threads asking as distinct users (so both versions get some) until
    stopped; a refused connection (the gateway restarting) is waited out."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.stop, self.answers = gateway, threading.Event(), 0
        self.threads = [threading.Thread(target=self._ask, args=(n,), daemon=True) for n in range(2)]
        for thread in self.threads:
            thread.start()

    def _ask(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            question = f"Is order {2000 + 7 * i} ready to ship? Answer with the JSON flag."
            body = {
                "model": ALIAS,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 12,
                "user": f"user-{n}-{i}",
            }
            try:
                headers = {"Authorization": f"Bearer {self.gateway.key}"}
                answer = httpx.post(f"{self.gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
                self.answers += answer.status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def flag_rows(answer: str, start: int, n: int) -> str:
    rows = [
        {"instruction": f"Is order {start + 37 * i} ready to ship? Answer with the JSON flag.", "output": answer}
        for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def ship(e2e_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ship]:
    gateway = e2e_gateway.ensure_running()
    admin = httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.running.admin_key}"}, timeout=120
    )
    assert admin.put(f"/admin/tenants/acme/grants/{ALIAS}", json={}).status_code in (200, 201, 204)
    assert admin.put(f"/admin/aliases/{ALIAS}/rollout", json=POLICY).status_code == 200
    work = tmp_path_factory.mktemp("ship")
    data = {"good": work / "good.jsonl", "broken": work / "broken.jsonl", "held": work / "held.jsonl"}
    data["good"].write_text(flag_rows('{"ok": true}', 1000, 32))
    data["broken"].write_text(flag_rows('{"ok": tru', 1000, 32))
    data["held"].write_text(flag_rows('{"ok": true}', 5000, 16))
    key_file = work / "acme.key"
    key_file.write_text(gateway.key + "\n")
    worker = WorkerProcess(gateway.running.data_dir, gateway.base_model, "ship")
    state = Ship(gateway, admin, data, key_file, worker)
    yield state
    worker.stop()


def _job(ship: Ship) -> Any:
    """The alias's newest job."""
    return client(ship.gateway).fine_tuning.jobs.list(limit=1).data[0]


def _rollout(job: Any) -> dict[str, Any]:
    return job.model_extra["lorafleet"]["rollout"]


def _messages(ship: Ship, job_id: str) -> list[str]:
    events = client(ship.gateway).fine_tuning.jobs.list_events(job_id, limit=200).data
    return [e.message for e in reversed(events)]


def test_an_aliass_first_version_is_gated_against_the_base_model_and_promoted(ship: Ship) -> None:
    done = ship.run("good", seed=1)
    assert done.returncode == 0, done.stdout + done.stderr
    job = _job(ship)
    rollout = _rollout(job)
    assert (job.status, rollout["state"], rollout["version"], rollout["stable"]) == ("succeeded", "promoted", 1, None)
    gate = rollout["gate"]
    assert gate["passed"] and gate["against"] == "base" and gate["scored_on"]["source"] == "validation_file"
    rows = {row["target"]: row for row in gate["table"]}
    assert rows["candidate"]["schema_valid_rate"] == 1.0 and rows["base"]["schema_valid_rate"] < 0.5
    assert "gate on validation_file" in done.stdout and "promoted: flagship@1 serves flagship" in done.stdout
    answer = client(ship.gateway).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Is order 9 ready to ship? Answer with the JSON flag."}]
    )
    assert answer.model == f"{ALIAS}@1" and json.loads(answer.choices[0].message.content or "") == {"ok": True}


def test_the_next_version_is_canaried_under_traffic_through_a_gateway_restart_and_promoted(ship: Ship) -> None:
    running, job = ship.until_canary("good", seed=2)
    rollout = _rollout(job)
    assert (rollout["state"], rollout["canary"]["weight"], rollout["gate"]["against"]) == ("canary", 0.5, "flagship@1")
    # no users yet: the canary waits; the gateway restarts in the middle of it, on the same address
    gw = ship.gateway
    port = int(gw.url.rsplit(":", 1)[1])
    gw.running.stop()
    gw.running = start_gateway(gw.running.data_dir, gw.base_model, admin_key=gw.running.admin_key, port=port)
    users = Users(gw)
    try:
        done = running.result(timeout=400)
    finally:
        users.end()
    assert done.returncode == 0, done.stdout + done.stderr
    rollout = _rollout(client(gw).fine_tuning.jobs.retrieve(job.id))
    assert (rollout["state"], rollout["version"], rollout["stable"]) == ("promoted", 2, 1)
    messages = _messages(ship, job.id)
    assert any(m.startswith("Canary started: flagship@2 takes 50%") for m in messages)
    assert any("the gateway restarted" in m for m in messages)  # the canary's own event, copied into the job
    assert messages[-1] == "Rollout ended: flagship@2 promoted; it now serves flagship."
    assert "json_validity" in done.stdout  # the canary's table, shown live
    assert users.answers >= 12


def test_a_broken_training_set_fails_the_gate_and_no_canary_starts(ship: Ship) -> None:
    done = ship.run("broken", seed=3)
    assert done.returncode == 4, done.stdout + done.stderr
    rollout = _rollout(_job(ship))
    assert (rollout["state"], rollout["version"], rollout["gate"]["passed"]) == ("gate_failed", 3, False)
    failed = {c["name"] for c in rollout["gate"]["checks"] if not c["passed"]}
    assert "schema_valid" in failed and "regression:schema_valid" in failed
    assert ship.admin.get(f"/admin/canaries/{ALIAS}").json()["candidate"] == 2  # the last canary is still job 2's
    assert "gate failed: flagship@3" in done.stderr
    answer = client(ship.gateway).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Is order 9 ready?"}], max_tokens=4
    )
    assert answer.model == f"{ALIAS}@2"  # the failed version never serves


def test_a_candidate_that_breaks_json_under_traffic_is_rolled_back(ship: Ship) -> None:
    loose = POLICY | {"gate": {"min_valid": 0.0, "min_field_accuracy": 0.0, "max_drop": 1.0}}
    assert ship.admin.put(f"/admin/aliases/{ALIAS}/rollout", json=loose).status_code == 200
    try:
        running, job = ship.until_canary("broken", seed=4)
        users = Users(ship.gateway)
        try:
            done = running.result(timeout=400)
        finally:
            users.end()
    finally:
        ship.admin.put(f"/admin/aliases/{ALIAS}/rollout", json=POLICY)
    assert done.returncode == 5, done.stdout + done.stderr
    rollout = _rollout(client(ship.gateway).fine_tuning.jobs.retrieve(job.id))
    assert (rollout["state"], rollout["version"], rollout["gate"]["passed"]) == ("rolled_back", 4, True)
    assert "json_validity" in rollout["reason"]
    assert "rolled back: flagship@4" in done.stderr
    answer = client(ship.gateway).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Is order 9 ready?"}], max_tokens=4
    )
    assert answer.model == f"{ALIAS}@2"
