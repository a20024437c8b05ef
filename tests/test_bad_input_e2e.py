"""The bad-input catalogue, against the live gateway and real vLLM: each case gets its status and error, and
nothing it sends hurts the engine (healthy, not restarted, still answering) or leaves anything in the store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from contract.store import AdapterStore
from tests.conftest import Gateway
from tests.fakes import tar_of

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
HOSTILE_PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}


@dataclass
class Env:
    http: httpx.Client
    gw: Gateway
    key: str  # tenant acme: orders and toolcall
    revoked_key: str
    disabled_key: str
    restarts: int

    def tenant(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gw.running.admin_key}"}

    def chat(self, key: str | None = None, **body: object) -> httpx.Response:
        payload = {"model": "orders", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | body
        return self.http.post(CHAT, json=payload, headers=self.tenant(key))

    def import_copy(self, name: str, adapter: Path, edit: Callable[[Path], None]) -> str:
        """A copy of ``adapter`` under the import root, spoilt by ``edit``; returns its path for publish."""
        target = self.gw.running.data_dir / "runs" / name
        shutil.copytree(adapter, target)
        edit(target)
        return name


@pytest.fixture(scope="module")
def env(e2e_gateway: Gateway, tiny_adapter: Path) -> Env:
    e2e_gateway.ensure_running()
    http = httpx.Client(base_url=e2e_gateway.url, timeout=120)
    admin = {"Authorization": f"Bearer {e2e_gateway.running.admin_key}"}
    shutil.copytree(tiny_adapter, e2e_gateway.running.data_dir / "runs" / "secret")
    published = http.post("/admin/adapters/secret/versions", json={"path": "secret"}, headers=admin)
    assert published.status_code == 201 and published.json()["loaded"], published.text

    def tenant(name: str, aliases: list[str]) -> str:
        resp = http.post("/admin/tenants", json={"name": name, "aliases": aliases}, headers=admin)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["api_key"])

    tenant("other", ["secret"])
    revoked = http.post("/admin/tenants/acme/keys", json={}, headers=admin).json()
    assert http.delete(f"/admin/tenants/acme/keys/{revoked['key_id']}", headers=admin).status_code == 204
    disabled = tenant("gone", ["orders"])
    assert http.patch("/admin/tenants/gone", json={"disabled": True}, headers=admin).status_code == 200
    restarts = http.get("/readyz", headers=admin).json()["engine_restarts"]
    return Env(http, e2e_gateway, e2e_gateway.key, revoked["api_key"], disabled, restarts)


def _edit_json(name: str, **fields: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        doc = json.loads((path / name).read_text())
        for key, value in fields.items():
            target, *rest = key.split(".")
            if rest:
                doc[target][rest[0]] = value
            else:
                doc[target] = value
        (path / name).write_text(json.dumps(doc))

    return edit


def _pickle_weights(path: Path) -> None:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")


# (name, request, status, error code); each request is a function of the environment and the tiny adapter.
Case = tuple[str, Callable[[Env, Path], httpx.Response], int, str | None]
CASES: list[Case] = [
    # -- the completion API ---------------------------------------------------------------------------
    ("malformed JSON", lambda e, _: e.http.post(CHAT, content=b'{"model": "orders",',
                                                headers=e.tenant() | {"content-type": "application/json"}),
     400, "invalid_json"),
    ("body is a list", lambda e, _: e.http.post(CHAT, json=[1, 2], headers=e.tenant()), 422, "invalid_field"),
    ("no messages", lambda e, _: e.http.post(CHAT, json={"model": "orders"}, headers=e.tenant()), 422,
     "invalid_field"),
    ("empty messages", lambda e, _: e.chat(messages=[]), 422, "invalid_field"),
    ("n too large", lambda e, _: e.chat(n=1000), 422, "invalid_field"),
    ("max_tokens zero", lambda e, _: e.chat(max_tokens=0), 422, "invalid_field"),
    ("max_tokens wrong type", lambda e, _: e.chat(max_tokens="lots"), 422, "invalid_field"),
    ("max_tokens beyond the context", lambda e, _: e.chat(max_tokens=10**9), 400, None),
    ("prompt beyond the context", lambda e, _: e.chat(messages=[{"role": "user", "content": "order " * 4000}]),
     400, None),
    ("temperature wrong type", lambda e, _: e.chat(temperature="hot"), 400, None),
    ("temperature negative", lambda e, _: e.chat(temperature=-1), 400, None),
    ("stream wrong type", lambda e, _: e.chat(stream="yes please"), 422, "invalid_field"),
    ("unknown alias", lambda e, _: e.chat(model="no-such-alias"), 404, "model_not_found"),
    ("another tenant's alias", lambda e, _: e.chat(model="secret"), 404, "model_not_found"),
    ("no key", lambda e, _: e.http.post(CHAT, json={"model": "orders", "messages": []}), 401, "invalid_api_key"),
    ("wrong key", lambda e, _: e.chat(key="lf-not-a-real-key"), 401, "invalid_api_key"),
    ("revoked key", lambda e, _: e.chat(key=e.revoked_key), 401, "invalid_api_key"),
    ("disabled tenant", lambda e, _: e.chat(key=e.disabled_key), 401, "invalid_api_key"),
    ("body too large", lambda e, _: e.chat(messages=[{"role": "user", "content": "x" * (2 << 20)}]), 413, None),
    ("gateway-only field", lambda e, _: e.chat(chat_template="{{ messages }}"), 400, "unsupported_parameter"),
    ("adapter by path", lambda e, _: e.chat(lora_request={"lora_path": "/etc"}), 400, "unsupported_parameter"),
    ("hostile schema pattern", lambda e, _: e.chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": HOSTILE_PATTERN}}), 400, "schema_refused"),
    ("schema nested too deep", lambda e, _: e.chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": json.loads('{"items":' * 40 + "{}" + "}" * 40)}}), 400, "schema_refused"),
    ("schema not a JSON Schema", lambda e, _: e.chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "banana"}}}), 400, "schema_refused"),
    ("unknown JSON mode", lambda e, _: e.chat(lorafleet={"json_mode": "strict"}), 422, "invalid_field"),
    ("tools for an alias not trained on calls", lambda e, _: e.chat(tools=[{"type": "function", "function": {
        "name": "f"}}]), 400, "tools_unsupported"),
    ("tool_choice naming no tool", lambda e, _: e.chat(model="toolcall", tools=[{"type": "function", "function": {
        "name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}), 400, "invalid_tools"),
    ("unknown route", lambda e, _: e.http.post("/v1/embeddings", json={}, headers=e.tenant()), 404, None),
    ("path trick", lambda e, _: e.http.get("/v1/%2e%2e/admin/tenants", headers=e.tenant()), 404, None),
    ("wrong method", lambda e, _: e.http.get(CHAT, headers=e.tenant()), 405, None),
    # -- the admin API ------------------------------------------------------------------------------------------
    ("admin route with a tenant key", lambda e, _: e.http.get("/admin/tenants", headers=e.tenant()), 401,
     "invalid_admin_key"),
    ("tenant name invalid", lambda e, _: e.http.post("/admin/tenants", json={"name": "Bad Name!"}, headers=e.admin),
     422, "invalid_field"),
    ("tenant exists", lambda e, _: e.http.post("/admin/tenants", json={"name": "acme"}, headers=e.admin), 400,
     "tenant_refused"),
    ("limits out of range", lambda e, _: e.http.patch("/admin/tenants/acme", json={"limits": {
        "requests_per_minute": -5}}, headers=e.admin), 422, "invalid_field"),
    ("grant to no tenant", lambda e, _: e.http.put("/admin/tenants/nobody/grants/orders", headers=e.admin), 404,
     "tenant_not_found"),
    ("promote a version that does not exist", lambda e, _: e.http.post("/admin/adapters/orders/promote",
                                                                         json={"version": 99}, headers=e.admin),
     404, "adapter_not_found"),
    ("alias policy with a hostile schema", lambda e, _: e.http.put("/admin/aliases/orders/policy", json={
        "default_schema": HOSTILE_PATTERN}, headers=e.admin), 400, "schema_refused"),
    # -- publishing -------------------------------------------------------------------------------------------
    ("pickle weights", lambda e, a: e.http.post("/admin/adapters/bad/versions", headers=e.admin, json={
        "path": e.import_copy("pickled", a, _pickle_weights)}), 400, "adapter_refused"),
    ("another base model", lambda e, a: e.http.post("/admin/adapters/bad/versions", headers=e.admin, json={
        "path": e.import_copy("other-base", a, _edit_json("lorafleet.json", **{"base_model.sha256": "0" * 64}))}),
     400, "adapter_refused"),
    ("rank above the engine's max", lambda e, a: e.http.post("/admin/adapters/bad/versions", headers=e.admin, json={
        "path": e.import_copy("rank", a, _edit_json("adapter_config.json", r=1024))}), 400, "adapter_refused"),
    ("modules_to_save", lambda e, a: e.http.post("/admin/adapters/bad/versions", headers=e.admin, json={
        "path": e.import_copy("mts", a, _edit_json("adapter_config.json", modules_to_save=["lm_head"]))}),
     400, "adapter_refused"),
    ("path outside the import root", lambda e, _: e.http.post("/admin/adapters/bad/versions", headers=e.admin,
                                                              json={"path": "/etc"}), 400, "outside_import_root"),
    ("archive escaping with ../", lambda e, _: e.http.post(
        "/admin/adapters/bad/versions", content=tar_of({"../evil.txt": b"x"}),
        headers=e.admin | {"content-type": "application/gzip"}), 400, "archive_refused"),
    ("not an archive", lambda e, _: e.http.post("/admin/adapters/bad/versions", content=b"PK\x03\x04garbage",
                                                headers=e.admin | {"content-type": "application/zip"}),
     400, "archive_refused"),
    ("invalid alias", lambda e, _: e.http.post("/admin/adapters/Bad Alias/versions", headers=e.admin,
                                               json={"path": "x"}), 400, "invalid_alias"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "send", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_harms_nothing(
    env: Env, tiny_adapter: Path, name: str, send: Callable[[Env, Path], httpx.Response], status: int, code: str | None
) -> None:
    resp = send(env, tiny_adapter)
    assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:500]}"
    error = resp.json()["error"]
    assert error["message"] and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    ready = env.http.get("/readyz", headers=env.admin).json()
    assert ready["status"] == "ready" and ready["engine_restarts"] == env.restarts, ready
    assert httpx.get(f"{env.gw.engine_url}/health", timeout=10).status_code == 200


def test_after_the_catalogue_the_engine_still_answers_and_the_store_is_clean(env: Env) -> None:
    assert len(CASES) >= 30
    assert env.chat(max_tokens=4).status_code == 200
    store = AdapterStore(env.gw.running.data_dir / "adapters")
    assert "bad" not in store.aliases()  # no refused publish left a version behind
    assert not any((store.root / ".staging").iterdir()) if (store.root / ".staging").exists() else True


def _generated_tokens(env: Env) -> float:
    text = httpx.get(f"{env.gw.engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))  # fmt: skip


def test_another_tenants_alias_costs_the_engine_nothing(env: Env) -> None:
    before = _generated_tokens(env)
    resp = env.chat(model="secret", max_tokens=50)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert _generated_tokens(env) == before  # refused before the engine: zero tokens generated
    other = env.http.get("/v1/models", headers=env.tenant()).json()
    assert "secret" not in [m["id"] for m in other["data"]]
