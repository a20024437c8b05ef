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
import contextlib
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
from selenium import webdriver
from selenium.webdriver.chrome.options import Options as ChromeOptions
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

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
        options = json.dumps(RECIPE)  # the answers' schema is the alias's (its policy), not the job's
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
    # From now on every version's answers are judged against the flag schema (gated, served, canaried): the
    # alias's policy, which an operator sets once the alias exists.
    policy = ship.admin.put(f"/admin/aliases/{ALIAS}/policy", json={"default_schema": FLAG_SCHEMA})
    assert policy.status_code == 200, policy.text


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


def test_the_console_shows_the_runs_in_a_real_browser(ship: Ship, tmp_path: Path) -> None:
    """Headless Chromium (Debian's, driven by Selenium) signs in with the tenant's key, then the admin key: the
    job's loss curve has the job's logged steps, the gate table its rows, the canary its metrics; screenshots are
    taken and looked at (``LORAFLEET_SCREENSHOTS``: a folder to keep them in, as docs/console.md's were)."""
    gw = ship.gateway.ensure_running()
    api = client(gw)
    listed = api.fine_tuning.jobs.list(limit=50).data
    jobs = [j for j in listed if (j.model_extra["lorafleet"]["options"] or {}).get("alias") == ALIAS]
    canaried = next(j for j in jobs if _rollout(j)["version"] == 2)
    logged = [e.data for e in api.fine_tuning.jobs.list_events(canaried.id, limit=500).data if e.type == "metrics"]
    shots = Path(os.environ.get("LORAFLEET_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with browser(tmp_path) as driver:
        sign_in(driver, gw.url, gw.key)
        home = driver.page_source
        assert all(j.id in home for j in jobs) and "flagship@2" in home
        driver.get(f"{gw.url}/console/jobs/{canaried.id}")
        curve = driver.find_element(By.CSS_SELECTOR, '#loss g[data-series="train_loss"]')
        assert (
            int(curve.get_attribute("data-points") or 0) == len({d["step"] for d in logged if "train_loss" in d}) >= 2
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gate tr")) == 1 + len(_rollout(canaried)["gate"]["table"])
        assert "promoted" in driver.find_element(By.ID, "rollout-state").text
        looked_at(driver, shots / "console-job.png")
        driver.get(f"{gw.url}/console/canaries/{ALIAS}")
        chart = '#metrics svg[aria-label="json_validity"] g[data-series="candidate"]'
        validity = driver.find_element(By.CSS_SELECTOR, chart)
        assert int(validity.get_attribute("data-points") or 0) >= 1
        assert "rolled back" in driver.find_element(By.ID, "canary-state").text
        looked_at(driver, shots / "console-canary.png")
        driver.find_element(By.CSS_SELECTOR, "header form button").click()  # sign out (a POST with its token)
        WebDriverWait(driver, 60).until(lambda d: d.current_url.endswith("/console/login"))
        sign_in(driver, gw.url, gw.running.admin_key)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#engines tr")) >= 2
        assert "acme" in driver.find_element(By.ID, "tenants").text
        looked_at(driver, shots / "console-operator.png")


@contextlib.contextmanager
def browser(work: Path) -> Iterator[Any]:
    options = ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    # Without these Chromium keeps calling Google's hosts, refused on a closed network.
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
    flags += ["--window-size=1280,1400", f"--user-data-dir={work / 'chromium'}"]
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: Any, url: str, key: str) -> None:
    driver.get(f"{url}/console")
    assert driver.current_url.endswith("/console/login")  # not signed in: sent to the form
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, 60).until(lambda d: d.current_url.endswith("/console"))  # the click does not wait
    assert driver.find_elements(By.CSS_SELECTOR, "header form")


def looked_at(driver: Any, path: Path) -> None:
    """Save a screenshot and check it is a page, not a blank: big enough, and many colours (text, tables, lines)."""
    from PIL import Image

    driver.save_screenshot(str(path))
    assert path.stat().st_size > 20_000, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, f"{path}: {len(colours)} colours"
