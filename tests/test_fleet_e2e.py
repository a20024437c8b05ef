"""One gateway over two real vLLM engines (supervised children on loopback): affinity and failover.

Both engines serve the test base model with two adapter slots each; four aliases fit those four slots.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from contract.store import AdapterStore
from lorafleet.launch import RunningGateway, free_port, start_gateway
from serving.tenants import TenantStore

ALIASES = ["fa", "fb", "fc", "fd"]
CHAT = "/v1/chat/completions"


@dataclass
class TwoEngines:
    gw: RunningGateway
    key: str
    ports: dict[str, int]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gw.admin_key}"}

    def engines(self) -> dict[str, dict]:
        listing = httpx.get(f"{self.gw.url}/admin/engines", headers=self.admin, timeout=10).json()["data"]
        return {e["name"]: e for e in listing}

    def chat(self, alias: str, **body: object) -> httpx.Response:
        payload = {"model": alias, "messages": [{"role": "user", "content": "Order 7: Ana, ana@x.io"}],
                   "max_tokens": 8} | body  # fmt: skip
        return httpx.post(f"{self.gw.url}{CHAT}", json=payload, timeout=300,
                          headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip

    def wait_healthy(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(e["healthy"] for e in self.engines().values()):
                return
            time.sleep(1)
        pytest.fail(f"the engines did not both come up: {self.engines()}\n{self.gw.log_tail()}")


@pytest.fixture(scope="module")
def two(tiny_adapter: Path, base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoEngines]:
    data_dir = tmp_path_factory.mktemp("fleet")
    store = AdapterStore(data_dir / "adapters")
    tenants = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    tenant = tenants.create("acme")
    for alias in ALIASES:
        store.publish(tiny_adapter, alias)
        tenants.grant(tenant, alias)
    ports = {"e1": free_port(), "e2": free_port()}
    engines_file = data_dir / "engines.yaml"
    engines_file.write_text("engines:\n" + "".join(f"  - name: {name}\n    port: {port}\n    max_loras: 2\n"
                                                  for name, port in ports.items()))  # fmt: skip
    try:
        gw = start_gateway(data_dir, base_model, engines_file=str(engines_file), kv_cache_gib="1")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    fleet = TwoEngines(gw, tenants.issue_key(tenant), ports)
    try:
        fleet.wait_healthy()
        yield fleet
    finally:
        gw.stop()


def _loads(fleet: TwoEngines) -> float:
    text = httpx.get(f"{fleet.gw.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('lorafleet_adapter_loads_total{outcome="success"}'))  # fmt: skip


def test_four_adapters_on_two_engines_with_two_slots_each_are_loaded_once(two: TwoEngines) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # three rounds of every alias at once: routing, not luck, keeps them apart
            answers = list(pool.map(lambda alias: two.chat(alias), ALIASES * 2))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    engines = two.engines()
    held = sorted(a for e in engines.values() for a in e["adapters"])
    assert held == sorted(f"{alias}@1" for alias in ALIASES), engines  # each on exactly one engine
    assert all(len(e["adapters"]) == 2 for e in engines.values()), engines
    assert _loads(two) == 4  # loaded once each: no thrash
    ready = httpx.get(f"{two.gw.url}/readyz", headers=two.admin, timeout=10).json()
    assert sorted(ready["engine_adapters"]) == held  # what the engines themselves say they hold


def _stream(two: TwoEngines, alias: str) -> str:
    """A whole streamed answer's text (error events included), or the exception's name."""
    body = {"model": alias, "messages": [{"role": "user", "content": "Order 9: Bo, bo@x.io"}], "max_tokens": 48,
            "stream": True, "ignore_eos": True}  # fmt: skip
    try:
        with httpx.stream("POST", f"{two.gw.url}{CHAT}", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {two.key}"}) as resp:  # fmt: skip
            return f"{resp.status_code} " + resp.read().decode()
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_an_engine_killed_under_load_loses_no_request_started_after_it(two: TwoEngines) -> None:
    holder = next(name for name, e in two.engines().items() if "fa@1" in e["adapters"])
    child = next(p for p in psutil.Process(two.gw.proc.pid).children()
                 if f"--port {two.ports[holder]}" in " ".join(p.cmdline()))  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        during = [pool.submit(_stream, two, "fa") for _ in range(8)]
        time.sleep(1.5)  # the streams are under way on the holder
        os.killpg(child.pid, signal.SIGKILL)
        after = [pool.submit(_stream, two, "fa") for _ in range(8)]
        cut = [f.result() for f in during]
        done = [f.result() for f in after]
    assert all(r.startswith("200 ") and r.rstrip().endswith("data: [DONE]") for r in done), done
    assert all('"error"' not in r for r in done)  # every request started after the kill answered in full
    for text in cut:  # the ones on the dead engine ended with an error event and [DONE]; none hung
        assert text.startswith("200 ") and text.rstrip().endswith("data: [DONE]"), text
    broken = [t for t in cut if "engine_stream_broken" in t]
    assert broken, cut
    for text in broken:
        events = [json.loads(e[6:]) for e in text[4:].split("\n\n") if e.startswith("data: {")]
        assert events[-1]["error"]["code"] == "engine_stream_broken"
    two.wait_healthy()  # the supervisor restarted it, and it is back in routing
    assert holder in two.engines() and two.engines()[holder]["healthy"]
    assert two.chat("fa").status_code == 200
