"""One gateway over four real vLLM engines (supervised children on loopback), started once for the module.

``e1`` and ``e2`` serve the test base model with two adapter slots each (four aliases fit those four slots):
affinity, spreading and failover. ``gemma`` serves another base model, Gemma 3 270M (as `lorafleet model pull
gemma-3-270m` provisions it): its adapter goes there and nowhere else. ``fast`` serves the ``ok`` adapter merged
into the base model, bound to ``ok@1``: that version's requests go there, until a promotion moves the alias.
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
from serving.state.tenants import TenantStore
from tests.conftest import session_gateway_steps_aside, trained_on

ALIASES = ["fa", "fb", "fc", "fd"]
CHAT = "/v1/chat/completions"


@dataclass
class Fleet:
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
        payload = {
            "model": alias,
            "messages": [{"role": "user", "content": "Order 7: Ana, ana@x.io"}],
            "max_tokens": 8,
        } | body
        return httpx.post(
            f"{self.gw.url}{CHAT}", json=payload, timeout=300, headers={"Authorization": f"Bearer {self.key}"}
        )

    def wait_healthy(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(e["healthy"] for e in self.engines().values()):
                return
            time.sleep(1)
        pytest.fail(f"the engines did not both come up: {self.engines()}\n{self.gw.log_tail()}")


@pytest.fixture(scope="module")
def two(
    tiny_adapter: Path,
    flag_adapters: dict[str, Path],
    tiny_train_file: Path,
    base_model: Path,
    gemma_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    from training.export import merge

    session_gateway_steps_aside()  # four engines here: the session's gateway makes room meanwhile
    data_dir = tmp_path_factory.mktemp("fleet")
    store = AdapterStore(data_dir / "adapters")
    tenants = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    tenant = tenants.create("acme")
    for alias in ALIASES:
        store.publish(tiny_adapter, alias)
    store.publish(trained_on(gemma_model, tiny_train_file, data_dir / "runs" / "gemma"), "ft")
    store.publish(flag_adapters["good"], "ok")
    merged = data_dir / "models" / "ok-1-merged"
    merge(store.get("ok", 1).path, merged, str(base_model))
    for alias in [*ALIASES, "ft", "ok", "base"]:
        tenants.grant(tenant, alias)
    ports = {"e1": free_port(), "e2": free_port(), "gemma": free_port(), "fast": free_port()}
    extra = {
        "e1": "",
        "e2": "",
        "gemma": f"    base: {gemma_model}\n",
        "fast": f"    base: {merged}\n    merged: ok@1\n",
    }
    slots = {"e1": 2, "e2": 2, "gemma": 1, "fast": 1}
    engines_file = data_dir / "engines.yaml"
    entries = [
        f"  - name: {name}\n    port: {port}\n    max_loras: {slots[name]}\n{extra[name]}"
        for name, port in ports.items()
    ]
    engines_file.write_text("engines:\n" + "".join(entries))
    try:
        gw = start_gateway(data_dir, base_model, engines_file=str(engines_file), kv_cache_gib="1")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    fleet = Fleet(gw, tenants.issue_key(tenant), ports)
    try:
        fleet.wait_healthy()
        yield fleet
    finally:
        gw.stop()


def _loads(fleet: Fleet) -> float:
    text = httpx.get(f"{fleet.gw.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('lorafleet_adapter_loads_total{outcome="success"}')
    )


def test_four_adapters_on_two_engines_with_two_slots_each_are_loaded_once(two: Fleet) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # three rounds of every alias at once: routing, not luck, keeps them apart
            answers = list(pool.map(lambda alias: two.chat(alias), ALIASES * 2))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    engines = two.engines()
    held = sorted(a for e in engines.values() for a in e["adapters"])
    assert held == sorted(f"{alias}@1" for alias in ALIASES), engines  # each on exactly one engine
    assert len(engines["e1"]["adapters"]) == len(engines["e2"]["adapters"]) == 2, engines
    assert _loads(two) == 4  # loaded once each: no thrash
    ready = httpx.get(f"{two.gw.url}/readyz", headers=two.admin, timeout=10).json()
    assert sorted(ready["engine_adapters"]) == held  # what the engines themselves say they hold


def _routed(fleet: Fleet) -> dict[tuple[str, str], float]:
    """lorafleet_fleet_routed_total by (engine, reason)."""
    text = httpx.get(f"{fleet.gw.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("lorafleet_fleet_routed_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1 : line.index("}")].split(","))
            out[(labels["engine"].strip('"'), labels["reason"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_hot_adapter_spreads_to_a_free_slot_under_load_and_only_then(two: Fleet) -> None:
    engines = two.engines()
    holder = next(name for name in ("e1", "e2") if "fa@1" in engines[name]["adapters"])
    other = "e2" if holder == "e1" else "e1"
    for alias in ALIASES[2:]:  # two slots come free (retired versions leave their engine)
        resp = httpx.delete(f"{two.gw.url}/admin/adapters/{alias}/versions/1", headers=two.admin, timeout=30)
        assert resp.status_code == 200, resp.text
    loads = _loads(two)
    deadline = time.monotonic() + 30  # the load the router reads (vLLM's metrics, polled) is back to nothing
    while any(e["running"] + e["waiting"] + e["in_flight"] for e in two.engines().values()):
        assert time.monotonic() < deadline, two.engines()
        time.sleep(0.5)
    time.sleep(1.5)  # one more poll after the last request ended
    assert two.chat("fa").status_code == 200 and "fa@1" not in two.engines()[other]["adapters"]  # cold: stays
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: _stream(two, "fa"), range(12)))
    assert all(a.startswith("200 ") and '"error"' not in a for a in answers), answers
    engines = two.engines()
    assert "fa@1" in engines[holder]["adapters"] and "fa@1" in engines[other]["adapters"], engines  # hot: spread
    assert _loads(two) - loads <= 2  # a copy on the free slot (fb may have taken the other), not a load per request
    assert _routed(two).get((other, "resident"), 0) > 0  # and requests followed it there


def test_two_base_models_at_once_each_alias_answered_by_its_own(two: Fleet) -> None:
    def per_engine() -> dict[str, float]:
        routed: dict[str, float] = {}
        for (engine, _), n in _routed(two).items():
            routed[engine] = routed.get(engine, 0) + n
        return routed

    before = per_engine()
    for alias in ("ft", "base", "fa", "ft"):
        resp = two.chat(alias)
        assert resp.status_code == 200, resp.text
    engines = two.engines()
    assert engines["gemma"]["adapters"] == ["ft@1"] and engines["gemma"]["base"] == "gemma-3-270m"
    assert all("ft@1" not in engines[name]["adapters"] for name in ("e1", "e2", "fast"))
    grown = {name: n - before.get(name, 0) for name, n in per_engine().items()}
    assert grown.get("gemma") == 2 and grown.get("fast", 0) == 0  # ft there, and nothing else
    assert grown.get("e1", 0) + grown.get("e2", 0) == 2  # base and fa on the test base model's engines


def test_a_merged_engine_serves_its_version_until_a_promotion_moves_the_alias(
    two: Fleet, flag_adapters: dict[str, Path]
) -> None:
    ask = {
        "messages": [{"role": "user", "content": "Is order 4242 ready to ship? Answer with the JSON flag."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    before = _routed(two).get(("fast", "merged"), 0)
    for _ in range(3):
        resp = two.chat("ok", **ask)
        assert resp.status_code == 200, resp.text
        assert json.loads(resp.json()["choices"][0]["message"]["content"]) == {"ok": True}  # the merged weights
    assert _routed(two)[("fast", "merged")] == before + 3
    assert all("ok@1" not in e["adapters"] for e in two.engines().values())  # never loaded as LoRA
    AdapterStore(two.gw.data_dir / "adapters").publish(flag_adapters["good2"], "ok")
    resp = httpx.post(
        f"{two.gw.url}/admin/adapters/ok/promote", json={"version": 2, "force": True}, headers=two.admin, timeout=60
    )
    assert resp.status_code == 200, resp.text
    answer = two.chat("ok", **ask)
    assert answer.status_code == 200 and answer.headers["x-lorafleet-adapter"] == "ok@2", answer.text
    assert json.loads(answer.json()["choices"][0]["message"]["content"]) == {"ok": True}
    assert _routed(two)[("fast", "merged")] == before + 3  # at once: the merged engine got nothing more


def _stream(two: Fleet, alias: str) -> str:
    """A whole streamed answer's text (error events included), or the exception's name."""
    body = {
        "model": alias,
        "messages": [{"role": "user", "content": "Order 9: Bo, bo@x.io"}],
        "max_tokens": 48,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        with httpx.stream(
            "POST", f"{two.gw.url}{CHAT}", json=body, timeout=300, headers={"Authorization": f"Bearer {two.key}"}
        ) as resp:
            return f"{resp.status_code} " + resp.read().decode()
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_an_engine_killed_under_load_loses_no_request_started_after_it(two: Fleet) -> None:
    holder = next(name for name, e in two.engines().items() if "fa@1" in e["adapters"])
    child = next(
        p for p in psutil.Process(two.gw.proc.pid).children() if f"--port {two.ports[holder]}" in " ".join(p.cmdline())
    )
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
