"""CLI writes go through a running gateway's admin API (found by its gateway.json), else straight to the store."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from contract.store import AdapterStore
from lorafleet.admin_client import AdminClient, AdminError, adapter_archive, running_gateway
from lorafleet.cli import app
from lorafleet.launch import free_port
from serving.app import build_app
from serving.config import GatewaySettings
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, fake_base


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeEngine]]:
    """A real gateway (uvicorn on a free port, fake engine) over ``tmp_path``, and the CLI's environment."""
    port = free_port()
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY, port=port)
    engine = FakeEngine()
    server = uvicorn.Server(uvicorn.Config(build_app(settings, engine=engine), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    for name, value in {
        "LORAFLEET_DATA_DIR": str(tmp_path),
        "LORAFLEET_BASE_MODEL": str(tmp_path / "base-model"),
        "LORAFLEET_ADMIN_KEY": ADMIN_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LORAFLEET_GATEWAY_URL", raising=False)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_writes_go_through_the_running_gateway(running: tuple[str, FakeEngine], tmp_path: Path) -> None:
    url, engine = running
    settings = GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY)
    assert running_gateway(settings) == url
    out = cli("adapters", "publish", str(make_adapter(tmp_path / "src")), "orders")
    assert "through the gateway" in out and "loaded on the engine" in out
    assert engine.loaded == ["orders@1"], "the gateway loaded it as it published it"
    key = cli("tenants", "create", "acme", "--alias", "orders", "--rpm", "100").strip().splitlines()[-1]
    chat = {"model": "orders", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers).status_code == 200
    cli("tenants", "disable", "acme")  # the gateway's key cache is dropped at once: no wait for its TTL
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers).status_code == 401
    cli("tenants", "enable", "acme")
    cli("adapters", "publish", str(make_adapter(tmp_path / "src2")), "orders")
    out = cli("adapters", "promote", "orders@1", "--force", "--reason", "baseline")
    assert "orders now serves version 1" in out
    out = cli("adapters", "retire", "orders@2")
    assert "retired orders@2" in out and "orders@2" not in engine.loaded, "unloaded by the gateway"
    out = cli("adapters", "policy", "orders", "--json-mode", "validate")
    assert "json_mode validate" in out
    assert (
        httpx.get(f"{url}/admin/aliases/orders/policy", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()[
            "json_mode"
        ]
        == "validate"
    )
    events = AdapterStore(tmp_path / "adapters").events("orders")
    assert [e["actor"] for e in events] == ["admin-api", "admin-api"]


def test_another_gateway_on_the_same_port_is_not_this_data_dirs(
    running: tuple[str, FakeEngine], tmp_path: Path
) -> None:
    """A live process and a gateway answering at the recorded URL are not enough: its instance id must match."""
    other = tmp_path / "other"
    other.mkdir()
    record = json.loads((tmp_path / "gateway.json").read_text())
    (other / "gateway.json").write_text(json.dumps(record | {"instance": "0" * 16}))
    assert running_gateway(GatewaySettings(data_dir=other, admin_key=ADMIN_KEY)) is None
    assert running_gateway(GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY)) == record["url"]


def test_a_refusal_is_the_gateways_own_message(running: tuple[str, FakeEngine], tmp_path: Path) -> None:
    url, _ = running
    client = AdminClient(url, ADMIN_KEY)
    with pytest.raises(AdminError, match="no version 7"):
        client.promote("orders", 7)
    result = CliRunner().invoke(app, ["adapters", "promote", "nope@3"])
    assert result.exit_code == 2 and "404" in result.output
    wrong = AdminClient(url, "not-the-admin-key-0000")
    with pytest.raises(AdminError, match="401"):
        wrong.tenant("acme")


def test_without_a_gateway_writes_go_to_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_BASE_MODEL", str(fake_base(tmp_path)))
    monkeypatch.delenv("LORAFLEET_GATEWAY_URL", raising=False)
    # A gateway.json left by a process that is gone is ignored.
    (tmp_path / "gateway.json").write_text('{"url": "http://127.0.0.1:9", "pid": 999999999, "instance": "x"}')
    out = cli("adapters", "publish", str(make_adapter(tmp_path / "src")), "orders")
    assert f"published orders@1 at {tmp_path}" in out
    assert AdapterStore(tmp_path / "adapters").latest("orders") is not None


def test_the_archive_carries_only_the_adapters_files(tmp_path: Path) -> None:
    import io
    import tarfile

    src = make_adapter(tmp_path / "src")
    (src / "notes.txt").write_text("not part of an adapter")
    with tarfile.open(fileobj=io.BytesIO(adapter_archive(src))) as tar:
        names = tar.getnames()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors", "lorafleet.json"]


def test_lorafleet_engines_lists_the_engines_behind_the_gateway(running: tuple[str, FakeEngine]) -> None:
    url, engine = running
    engine.exposition = b'vllm:num_requests_running{engine="0",model_name="base"} 2.0\n'
    table = cli("engines", "--gateway", url)
    assert "engine" in table and "up" in table
    listing = json.loads(cli("engines", "--gateway", url, "--json"))
    assert [e["name"] for e in listing] == ["engine"] and listing[0]["healthy"] is True
    assert listing[0]["max_loras"] == 4 and isinstance(listing[0]["adapters"], list)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'lorafleet_fleet_engine_up{engine="engine"} 1.0' in metrics
