"""The gateway's metrics, request ids and access log, against the fake engine."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, chat, fake_base

SERIES_CAP = 400  # what 1,000 bogus aliases and keys must not push the exposition past


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GatewaySettings, dict[str, str]]:
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    store = AdapterStore(settings.adapters_dir)
    schema = {"type": "object", "required": ["a"]}
    adapter = make_adapter(tmp_path / "orders")
    manifest = json.loads((adapter / "lorafleet.json").read_text()) | {"output_schema": schema}
    (adapter / "lorafleet.json").write_text(json.dumps(manifest))
    store.publish(adapter, "orders")
    tenants = TenantStore(settings.state_url)
    keys = {}
    for name in ("acme", "beta", "gamma"):
        tenant = tenants.create(name)
        tenants.grant(tenant, "orders")
        keys[name] = tenants.issue_key(tenant)
    return settings, keys


def open_gateway(settings: GatewaySettings) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine


@pytest.fixture
def gw(setup) -> Iterator[tuple[TestClient, FakeEngine, dict[str, str]]]:
    settings, keys = setup
    for client, engine in open_gateway(settings):
        yield client, engine, keys


ORDERS = {"alias": "orders", "version": "1", "variant": "stable"}


def test_promtool_accepts_a_live_scrape(gw) -> None:
    client, _, keys = gw
    chat(client, keys["acme"])
    chat(client, keys["acme"], stream=True)
    chat(client, "lf-wrong")
    assert shutil.which("promtool"), "promtool is missing: `apt-get install prometheus` (make test does it)"
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=client.get("/metrics").text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
