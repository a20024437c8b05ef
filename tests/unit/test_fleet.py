"""One gateway over several engines (fake ones here): the engines file, affinity, failover, load polling."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from contract.basemodel import BaseModelRecord, MergedFrom, sha256_file, write_record
from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.engines.specs import EnginesFileError, load_engines_file
from serving.engines.vllm import VLLMEngine
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base

ALIASES = ["a", "b", "c", "d"]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BASE_SIZES = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
}  # as tests.fakes.fake_base


def published(tmp_path: Path, aliases: list[str], **settings: object) -> tuple[GatewaySettings, str]:
    """Settings over ``tmp_path`` (the fake base model, no load polling) with ``aliases`` published and
    granted to tenant acme; and acme's key."""
    config = GatewaySettings(
        data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY, engine_poll_s=3600, **settings
    )  # type: ignore[arg-type]
    store = AdapterStore(config.adapters_dir)
    tenants = TenantStore(config.state_url)
    acme = tenants.create("acme")
    for alias in aliases:
        store.publish(make_adapter(tmp_path / f"src-{alias}"), alias)
        tenants.grant(acme, alias)
    return config, tenants.issue_key(acme)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, FakeEngine], str]]:
    """Two engines with two adapter slots each, four aliases (they fit the fleet's four slots)."""
    settings, key = published(tmp_path, ALIASES, max_loras=2)
    engines = {"e1": FakeEngine(), "e2": FakeEngine()}
    with TestClient(build_app(settings, engine=engines)) as client:  # type: ignore[arg-type]
        yield client, engines, key


def test_each_adapter_is_loaded_once_and_requests_follow_it(fleet) -> None:
    client, engines, key = fleet
    assert all(e.loaded == [] for e in engines.values())  # a fleet loads where requests are routed, not all
    for _ in range(5):
        for alias in ALIASES:
            resp = chat(client, key, model=alias)
            assert resp.status_code == 200, resp.text
    loads = sorted(engines["e1"].loaded + engines["e2"].loaded)
    assert loads == [f"{a}@1" for a in ALIASES]  # each loaded once: no thrash
    assert all(len(e.loaded) == 2 for e in engines.values())  # spread over the two engines' slots
    for alias in ALIASES:  # and every request for an alias went where it is loaded
        holder = next(name for name, e in engines.items() if f"{alias}@1" in e.loaded)
        assert all(r["model"] != f"{alias}@1" for r in engines["e1" if holder == "e2" else "e2"].requests)


def test_requests_arriving_while_an_adapter_loads_wait_for_that_load_not_another(tmp_path: Path) -> None:
    # A load-bound cap this wide never spreads the adapter: a second copy could only come from the race, a
    # request routed while the first load was still on its way finding the adapter resident nowhere.
    settings, key = published(tmp_path, ["a"], max_loras=2, route_epsilon=10)
    engines = {"e1": FakeEngine(), "e2": FakeEngine()}
    for engine in engines.values():
        engine.load_delay = 0.3  # a slow load: the other requests arrive meanwhile

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
            answers = await asyncio.gather(
                *(
                    client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    for _ in range(6)
                )
            )
        return [r.status_code for r in answers]

    app = build_app(settings, engine=engines)  # type: ignore[arg-type]

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            return await burst()

    assert asyncio.run(main()) == [200] * 6
    assert sorted(engines["e1"].loaded + engines["e2"].loaded) == ["a@1"]  # loaded once, on one engine


def test_a_dead_engine_is_routed_around_before_the_first_byte(fleet) -> None:
    client, engines, key = fleet
    assert chat(client, key, model="a").status_code == 200
    holder = next(name for name, e in engines.items() if "a@1" in e.loaded)
    other = "e2" if holder == "e1" else "e1"
    engines[holder].unreachable = True  # dies: connections refused
    for stream in (False, True):
        resp = chat(client, key, model="a", stream=stream)
        assert resp.status_code == 200, resp.text  # retried on the other engine, which loaded the adapter
    assert "a@1" in engines[other].loaded
    assert f'lorafleet_engine_failovers_total{{engine="{holder}"}} 1.0' in client.get("/metrics").text
    before = len(engines[holder].request_ids)
    assert chat(client, key, model="b").status_code == 200  # marked down: not even tried any more
    assert len(engines[holder].request_ids) == before


def test_a_502_or_503_before_the_first_byte_is_retried_elsewhere_and_only_once(fleet) -> None:
    client, engines, key = fleet
    for engine in engines.values():
        engine.refuse = lambda body: httpx.Response(503, json={"error": {"message": "overloaded", "code": 503}})
    resp = chat(client, key, model="c")
    assert_openai_error(resp, 503, "engine_unavailable")  # both refused: the second answer comes back, no loop
    assert sum(len(e.request_ids) for e in engines.values()) == 2


def test_when_every_engine_is_down_requests_get_503_and_no_hang(fleet) -> None:
    client, engines, key = fleet
    for engine in engines.values():
        engine.unreachable = True
    resp = chat(client, key, model="a")
    assert_openai_error(resp, 503)
    assert resp.headers["retry-after"]


def test_the_poller_reads_each_engines_load_and_marks_a_silent_one_down(fleet) -> None:
    client, engines, _ = fleet
    fleet_state = client.app.state.gateway.engine  # type: ignore[attr-defined]
    engines["e1"].exposition = (
        b'vllm:num_requests_running{engine="0",model_name="base"} 3.0\n'
        b'vllm:num_requests_waiting{engine="0",model_name="base"} 4.0\n'
    )
    engines["e2"].unreachable = True
    client.portal.call(fleet_state._read_load, "e1")  # type: ignore[union-attr]
    client.portal.call(fleet_state._read_load, "e2")  # type: ignore[union-attr]
    assert fleet_state.loads["e1"].queued == 7
    assert not fleet_state.healthy("e2") and fleet_state.is_ready()  # one engine down: the fleet still serves
    engines["e2"].unreachable = False
    client.portal.call(fleet_state._read_load, "e2")  # type: ignore[union-attr]
    assert fleet_state.healthy("e2")  # back once it answers


# -- the engines file ---------------------------------------------------------------------------------------------


def test_an_engines_file_is_read_with_its_keys_and_store_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_A_KEY", "engine-a-secret")
    path = tmp_path / "engines.yaml"
    path.write_text("""
engines:
  - name: local
    port: 8101
    max_loras: 2
  - name: gpu-a
    url: http://10.0.0.5:8000
    key_env: GPU_A_KEY
    max_loras: 8
    store_prefix: /mnt/adapters
""")
    local, remote = load_engines_file(path)
    assert (local.port, local.url, local.max_loras) == (8101, None, 2)
    assert remote.api_key() is not None and remote.api_key().get_secret_value() == "engine-a-secret"  # type: ignore[union-attr]
    settings = GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY, engines_file=path)
    engine = VLLMEngine(settings, remote)
    adapter = settings.adapters_dir / "orders" / "3"
    assert engine.engine_path(adapter) == "/mnt/adapters/orders/3"  # where that engine mounts the store
    assert VLLMEngine(settings, local).engine_path(adapter) == str(adapter.resolve())


def test_a_supervised_engine_gets_its_own_cores_or_gpus_and_base_model(tmp_path: Path) -> None:
    from serving.engines.specs import EngineSpec
    from serving.engines.vllm import child_env, vllm_command

    settings = GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY)
    pinned = EngineSpec(name="cpu", port=8101, cpus="0-3,8", base=str(tmp_path))
    assert child_env(settings, "k", {}, pinned)["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,8"
    assert child_env(settings, "k", {}, EngineSpec(name="gpu", port=8102, gpus="1"))["CUDA_VISIBLE_DEVICES"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in child_env(settings, "k", {}, EngineSpec(name="all", port=8103))
    command = vllm_command(settings, pinned)
    assert command[command.index("--model") + 1] == str(tmp_path)  # its own base model


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("engines: []", "engines: List should have at least 1 item"),
        ("engines:\n  - name: x\n", "engine 'x': : Value error, give either 'url'"),
        ("engines:\n  - name: x\n    port: 1\n  - name: x\n    port: 2\n", "engine names must be unique"),
        ("engines:\n  - name: x\n    port: 1\n  - name: y\n    port: 1\n", "different ports"),
        ("engines:\n  - name: x\n    url: http://h\n    port: 3\n", "'port', 'extra_args', 'cpus' and 'gpus' are for"),
        ("engines:\n  - name: x\n    port: 1\n    cpus: all\n", "engine 'x': cpus: String should match pattern"),
        ("engines:\n  - name: x\n    port: 1\n    merged: orders@3\n", "'merged: orders@3' needs 'base'"),
        ("engines:\n  - name: x\n    url: http://h\n    key_env: NOT_SET_ANYWHERE\n", "NOT_SET_ANYWHERE is not set"),
        ("engines:\n  - name: x\n    port: 1\n    colour: red\n", "engine 'x': colour: Extra inputs"),
        ("engines: [", "cannot be read as YAML"),
    ],
)
def test_a_bad_engines_file_names_the_engine_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "engines.yaml"
    path.write_text(text)
    with pytest.raises(EnginesFileError) as refused:
        load_engines_file(path)
    assert str(path) in str(refused.value) and message in str(refused.value), str(refused.value)


def test_without_an_engines_file_the_gateway_has_its_one_engine(tmp_path: Path) -> None:
    settings = GatewaySettings(
        data_dir=tmp_path, admin_key=ADMIN_KEY, engine_url="http://127.0.0.1:9999", engine_key="k" * 20, max_loras=3
    )
    engine = VLLMEngine(settings)
    assert engine.name == "engine" and engine.url == "http://127.0.0.1:9999" and engine.external
    assert engine.spec.max_loras == 3
    asyncio.run(engine.stop())


def test_the_admin_api_and_the_metrics_show_each_engine(fleet) -> None:
    client, _, key = fleet
    assert chat(client, key, model="a").status_code == 200
    listing = client.get("/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert [e["name"] for e in listing] == ["e1", "e2"] and all(e["healthy"] for e in listing)
    assert sorted(a for e in listing for a in e["adapters"]) == ["a@1"]
    metrics = client.get("/metrics").text
    assert 'lorafleet_fleet_engine_up{engine="e1"} 1.0' in metrics and 'engine="e2"' in metrics
    assert 'lorafleet_fleet_engine_adapters{engine="' in metrics


def test_an_engine_serving_another_base_model_is_refused_and_never_routed(tmp_path: Path) -> None:
    settings, key = published(tmp_path, ["a"])
    engines = {"right": FakeEngine(), "wrong": FakeEngine()}
    engines["wrong"].root = "/models/Llama-3-8B"
    with TestClient(build_app(settings, engine=engines)) as client:  # type: ignore[arg-type]
        for _ in range(4):
            assert chat(client, key, model="a").status_code == 200
        assert engines["wrong"].requests == [] and engines["wrong"].loaded == []
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        listing = {e["name"]: e for e in client.get("/admin/engines", headers=admin).json()["data"]}
        assert listing["wrong"]["healthy"] is False
        assert "Llama-3-8B" in listing["wrong"]["refused"] and "base-model" in listing["wrong"]["refused"]
        assert listing["right"]["refused"] is None


# -- engines found by DNS (a headless Service) ---------------------------------------------------------------------


def test_a_discovered_entry_is_one_engine_per_address() -> None:
    from serving.engines.discovery import discovered
    from serving.engines.specs import EngineSpec

    pool = EngineSpec(name="pool", url="http://vllm-headless:8000", discover="dns", max_loras=8, key="k" * 20)
    fixed = EngineSpec(name="local", port=8101)
    addresses = {"vllm-headless": ["10.0.0.7", "10.0.0.5", "fd00::1"]}

    dns_down = False

    def resolver(host: str, port: int) -> list[str]:
        assert port == 8000
        if dns_down:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host not in addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return sorted(addresses[host])

    last_good: dict[str, list[str]] = {}
    specs = asyncio.run(discovered([fixed, pool], resolver, last_good))
    names = ["local", "pool-10-0-0-5", "pool-10-0-0-7", "pool-fd00--1"]
    assert [s.name for s in specs] == names
    assert [s.url for s in specs[1:]] == ["http://10.0.0.5:8000", "http://10.0.0.7:8000", "http://[fd00::1]:8000"]
    assert all(s.max_loras == 8 and s.key is not None and s.discover is None for s in specs[1:])
    dns_down = True  # DNS does not answer: the engines it named last stay (they were all dropped, everywhere)
    assert [s.name for s in asyncio.run(discovered([fixed, pool], resolver, last_good))] == names
    dns_down = False
    addresses.clear()  # DNS answers that the name has no address (no ready pod): none of its engines
    assert [s.name for s in asyncio.run(discovered([fixed, pool], resolver, last_good))] == ["local"]


def test_discovery_adds_and_removes_engines_as_the_name_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.engines import discovery

    answer = {"addresses": ["127.0.0.2"]}
    monkeypatch.setattr(discovery, "resolve", lambda host, port: list(answer["addresses"]))
    path = tmp_path / "engines.yaml"
    path.write_text("engines:\n  - name: pool\n    url: http://svc:9\n    discover: dns\n")
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        engines_file=path,
        discovery_s=0.05,
        upstream_timeout_s=0.1,
    )
    with TestClient(build_app(settings)) as client:
        state = client.app.state.gateway  # type: ignore[attr-defined]

        def settles_on(expected: list[str]) -> bool:
            deadline = time.monotonic() + 10
            while sorted(state.engine.members) != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            return sorted(state.engine.members) == expected

        assert settles_on(["pool-127-0-0-2"]) and state.engine.several
        answer["addresses"] = ["127.0.0.2", "127.0.0.3"]  # a pod came up
        assert settles_on(["pool-127-0-0-2", "pool-127-0-0-3"])
        state.metrics.failovers.labels("pool-127-0-0-2").inc()  # series of its own, as routing would make
        state.metrics.routed.labels("pool-127-0-0-2", "free_slot").inc()
        answer["addresses"] = ["127.0.0.3"]  # the other one went away
        assert settles_on(["pool-127-0-0-3"])
        assert sorted(state.adapters.engines) == ["pool-127-0-0-3"]  # its adapters' side is gone too
        assert "pool-127-0-0-2" not in client.get("/metrics").text  # and its series: addresses never pile up


# -- several base models, and an engine serving one adapter version merged ------------------------------------------


def other_base(tmp_path: Path, name: str, sha256: str, merged_from: MergedFrom | None = None) -> Path:
    """Another base model directory (identity record and layer sizes, no weights), like ``fake_base``."""
    path = tmp_path / name
    path.mkdir()
    write_record(path, BaseModelRecord(name=name, sha256=sha256, source="test", merged_from=merged_from))
    (path / "config.json").write_text(json.dumps(BASE_SIZES))
    return path


def engines_yaml(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "engines.yaml"
    path.write_text("engines:\n" + "".join(f"  - {{{entry}}}\n" for entry in entries))
    return path


def test_each_adapter_goes_only_to_engines_serving_its_base_model(tmp_path: Path) -> None:
    gemma = other_base(tmp_path, "gemma-like", "cd" * 32)
    settings, key = published(
        tmp_path,
        ["a"],
        max_loras=2,
        engines_file=engines_yaml(
            tmp_path, "name: m1, port: 9001", "name: m2, port: 9002", f"name: g, port: 9003, base: {gemma}"
        ),
    )
    tenants = TenantStore(settings.state_url)
    AdapterStore(settings.adapters_dir).publish(make_adapter(tmp_path / "src-g", base_sha256="cd" * 32), "g")
    acme = tenants.get("acme")
    assert acme is not None
    tenants.grant(acme, "g")
    tenants.grant(acme, "base")
    engines = {"m1": FakeEngine(), "m2": FakeEngine(), "g": FakeEngine()}
    engines["g"].root = str(gemma)
    with TestClient(build_app(settings, engine=engines)) as client:  # type: ignore[arg-type]
        for _ in range(6):  # many at once and one by one: neither spreads an adapter to the other base's engine
            for alias in ("a", "g", "base"):
                assert chat(client, key, model=alias).status_code == 200
        assert engines["g"].loaded == ["g@1"]
        assert {r["model"] for r in engines["g"].requests} == {"g@1"}
        for name in ("m1", "m2"):
            assert "g@1" not in engines[name].loaded
            assert {r["model"] for r in engines[name].requests} <= {"a@1", "base"}
        listing = {e["name"]: e for e in client.get("/admin/engines", headers=ADMIN).json()["data"]}
        assert listing["g"]["base"] == "gemma-like" and listing["m1"]["base"] == "m"
        engines["g"].unreachable = True  # its only engine is down: 503, never the other base's engines
        assert_openai_error(chat(client, key, model="g"), 503, "engine_unavailable")  # it failed this one
        assert_openai_error(chat(client, key, model="g"), 503, "engine_starting")  # and is out of routing
        assert {r["model"] for e in ("m1", "m2") for r in engines[e].requests} <= {"a@1", "base"}


def test_an_adapter_for_a_base_no_engine_serves_is_stored_with_a_warning(tmp_path: Path) -> None:
    settings, key = published(tmp_path, ["a"])
    tenants = TenantStore(settings.state_url)
    acme = tenants.get("acme")
    assert acme is not None
    tenants.grant(acme, "x")
    source = make_adapter(settings.data_dir / "runs" / "x", base_sha256="ef" * 32)
    manifest = json.loads((source / "lorafleet.json").read_text())
    manifest["base_model"]["name"] = "gemma-x"  # a base model no engine serves (under any name)
    (source / "lorafleet.json").write_text(json.dumps(manifest))
    with TestClient(build_app(settings, engine=FakeEngine())) as client:  # type: ignore[arg-type]
        resp = client.post("/admin/adapters/x/versions", json={"path": "x"}, headers=ADMIN)
        assert resp.status_code == 201, resp.text
        warning = resp.json()["warnings"][0]
        assert warning.startswith("x@1: no engine serves its base model gemma-x (efefefefefef)") and "m (ab)" in warning
        ready = client.get("/readyz", headers=ADMIN).json()
        assert ready["adapters_unserved"] == {"x": warning} and ready["adapters_pending"] == ["x"]
        assert "lorafleet_adapters_pending 1.0" in client.get("/metrics").text  # the not-servable alert's input
        error = assert_openai_error(chat(client, key, model="x"), 503, "adapter_unavailable")
        assert "no engine serves the base model" in error["message"]
        assert chat(client, key, model="a").status_code == 200  # the others are unaffected


def test_a_merged_engine_takes_its_version_first_and_the_lora_path_takes_over(tmp_path: Path) -> None:
    settings, key = published(tmp_path, ["a", "b"], max_loras=2)
    store = AdapterStore(settings.adapters_dir)
    weights = sha256_file(store.get("a", 1).path / "adapter_model.safetensors")
    fast = other_base(
        tmp_path,
        "a1-merged",
        "0e" * 32,
        MergedFrom(adapter="a@1", adapter_sha256=weights, base_name="m", base_sha256="ab"),
    )
    stale = other_base(
        tmp_path,
        "b1-merged",
        "0f" * 32,
        MergedFrom(adapter="old", adapter_sha256="00" * 32, base_name="m", base_sha256="ab"),
    )
    settings.engines_file = engines_yaml(
        tmp_path,
        "name: lora, port: 9001",
        f"name: fast, port: 9002, base: {fast}, merged: a@1",
        f"name: stale, port: 9003, base: {stale}, merged: b@1",
    )
    engines = {"lora": FakeEngine(), "fast": FakeEngine(), "stale": FakeEngine()}
    engines["fast"].root, engines["stale"].root = str(fast), str(stale)
    with TestClient(build_app(settings, engine=engines)) as client:  # type: ignore[arg-type]
        for _ in range(4):
            assert chat(client, key, model="a").status_code == 200
            assert chat(client, key, model="b").status_code == 200
        assert [r["model"] for r in engines["fast"].requests] == ["base"] * 4  # a@1 at base-model speed
        assert engines["fast"].loaded == [] and "a@1" not in engines["lora"].loaded
        listing = {e["name"]: e for e in client.get("/admin/engines", headers=ADMIN).json()["data"]}
        assert listing["fast"]["merged"] == "a@1" and listing["fast"]["healthy"]
        assert "merged from other adapter weights" in listing["stale"]["refused"]  # b@1 is not what it holds
        assert engines["stale"].requests == []
        metrics = client.get("/metrics").text
        assert 'lorafleet_fleet_routed_total{engine="fast",reason="merged"} 4.0' in metrics

        engines["fast"].unreachable = True  # down: a@1 falls back to the LoRA path, before any byte
        assert chat(client, key, model="a").status_code == 200
        assert engines["lora"].requests[-1]["model"] == "a@1" and "a@1" in engines["lora"].loaded
        engines["fast"].unreachable = False
        client.app.state.gateway.engine.up("fast")  # type: ignore[attr-defined]  # its health check passed

        store.publish(make_adapter(tmp_path / "src-a2"), "a")
        resp = client.post("/admin/adapters/a/promote", json={"version": 2, "force": True}, headers=ADMIN)
        assert resp.status_code == 200, resp.text
        sent = len(engines["fast"].requests)
        assert chat(client, key, model="a").status_code == 200  # promoted: at once, no longer the merged engine's
        assert len(engines["fast"].requests) == sent and engines["lora"].requests[-1]["model"] == "a@2"
