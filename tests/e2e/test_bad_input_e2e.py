"""The bad-input catalogue, against the live gateway and real vLLM: each case gets its status and error, and
nothing it sends hurts the engine (healthy, not restarted, still answering) or leaves anything in the store."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contract.store import AdapterStore
from tests.conftest import Gateway
from tests.fakes import tar_of

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
    other_key: str  # tenant "other": alias "secret"

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

    other_key = tenant("other", ["secret"])
    revoked = http.post("/admin/tenants/acme/keys", json={}, headers=admin).json()
    assert http.delete(f"/admin/tenants/acme/keys/{revoked['key_id']}", headers=admin).status_code == 204
    disabled = tenant("gone", ["orders"])
    assert http.patch("/admin/tenants/gone", json={"disabled": True}, headers=admin).status_code == 200
    restarts = http.get("/readyz", headers=admin).json()["engine_restarts"]
    return Env(http, e2e_gateway, e2e_gateway.key, revoked["api_key"], disabled, restarts, other_key)


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
    (
        "malformed JSON",
        lambda e, _: e.http.post(
            CHAT, content=b'{"model": "orders",', headers=e.tenant() | {"content-type": "application/json"}
        ),
        400,
        "invalid_json",
    ),
    ("body is a list", lambda e, _: e.http.post(CHAT, json=[1, 2], headers=e.tenant()), 422, "invalid_field"),
    ("no messages", lambda e, _: e.http.post(CHAT, json={"model": "orders"}, headers=e.tenant()), 422, "invalid_field"),
    ("empty messages", lambda e, _: e.chat(messages=[]), 422, "invalid_field"),
    ("n too large", lambda e, _: e.chat(n=1000), 422, "invalid_field"),
    ("max_tokens zero", lambda e, _: e.chat(max_tokens=0), 422, "invalid_field"),
    ("max_tokens wrong type", lambda e, _: e.chat(max_tokens="lots"), 422, "invalid_field"),
    ("max_tokens beyond the context", lambda e, _: e.chat(max_tokens=10**9), 400, "answer_too_large"),
    (
        "max_tokens beyond the context, streamed",
        lambda e, _: e.chat(max_tokens=10**6, stream=True),
        400,
        "engine_rejected",
    ),
    ("max_tokens beyond 2**30", lambda e, _: e.chat(max_tokens=2**40), 422, "invalid_field"),
    (
        "a whole answer too large",
        lambda e, _: e.chat(n=16, logprobs=True, top_logprobs=20, max_tokens=2048),
        400,
        "answer_too_large",
    ),
    ("top_logprobs out of range", lambda e, _: e.chat(logprobs=True, top_logprobs=21), 422, "invalid_field"),
    ("seed beyond 64 bits", lambda e, _: e.chat(seed=2**70), 422, "invalid_field"),
    ("stop token id out of range", lambda e, _: e.chat(stop_token_ids=[2**40]), 422, "invalid_field"),
    ("logit_bias token id out of range", lambda e, _: e.chat(logit_bias={"99999999999": 1}), 422, "invalid_field"),
    ("top_k out of range", lambda e, _: e.chat(top_k=10**9), 422, "invalid_field"),
    ("3,000 messages", lambda e, _: e.chat(messages=[{"role": "user", "content": "x"}] * 3000), 422, "invalid_field"),
    (
        "an image content part (a text model)",
        lambda e, _: e.chat(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
        ),
        400,
        "unsupported_parameter",
    ),
    ("a model name that looks like a path", lambda e, _: e.chat(model="../../etc/passwd"), 404, "model_not_found"),
    ("a model name of 5,000 characters", lambda e, _: e.chat(model="o" * 5000), 422, "invalid_field"),
    (
        "a schema whose $ref loops",
        lambda e, _: e.chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
            }
        ),
        400,
        "schema_refused",
    ),
    (
        "prompt beyond the context",
        lambda e, _: e.chat(messages=[{"role": "user", "content": "order " * 4000}]),
        400,
        "engine_rejected",
    ),
    ("temperature wrong type", lambda e, _: e.chat(temperature="hot"), 422, "invalid_field"),
    ("temperature negative", lambda e, _: e.chat(temperature=-1), 422, "invalid_field"),
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
    (
        "hostile schema pattern",
        lambda e, _: e.chat(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": HOSTILE_PATTERN}}
        ),
        400,
        "schema_refused",
    ),
    (
        "schema nested too deep",
        lambda e, _: e.chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": json.loads('{"items":' * 40 + "{}" + "}" * 40)},
            }
        ),
        400,
        "schema_refused",
    ),
    (
        "schema not a JSON Schema",
        lambda e, _: e.chat(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}
        ),
        400,
        "schema_refused",
    ),
    ("unknown JSON mode", lambda e, _: e.chat(lorafleet={"json_mode": "strict"}), 422, "invalid_field"),
    (
        "tools for an alias not trained on calls",
        lambda e, _: e.chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools_unsupported",
    ),
    (
        "tool_choice naming no tool",
        lambda e, _: e.chat(
            model="toolcall",
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "invalid_tools",
    ),
    # -- the allowlist: vLLM's own request fields never reach it ---------------------------------------
    (
        "vLLM's structured_outputs regex",
        lambda e, _: e.chat(structured_outputs={"regex": "[0-9]{5}"}),
        400,
        "unsupported_parameter",
    ),
    ("guided_json", lambda e, _: e.chat(guided_json={"type": "object"}), 400, "unsupported_parameter"),
    ("guided_grammar", lambda e, _: e.chat(guided_grammar="root ::= 'a'"), 400, "unsupported_parameter"),
    ("vllm_xargs", lambda e, _: e.chat(vllm_xargs={"a": 1}), 400, "unsupported_parameter"),
    (
        "kv_transfer_params",
        lambda e, _: e.chat(kv_transfer_params={"do_remote_decode": True}),
        400,
        "unsupported_parameter",
    ),
    ("priority", lambda e, _: e.chat(priority=-1000), 400, "unsupported_parameter"),
    ("logits_processors", lambda e, _: e.chat(logits_processors=["x"]), 400, "unsupported_parameter"),
    ("return_tokens_as_token_ids", lambda e, _: e.chat(return_tokens_as_token_ids=True), 400, "unsupported_parameter"),
    (
        "unknown field in a message",
        lambda e, _: e.chat(messages=[{"role": "user", "content": "x", "extra": 1}]),
        400,
        "unsupported_parameter",
    ),
    # -- bounds on what one request makes the engine do ------------------------------------------------
    (
        "64 prompts",
        lambda e, _: e.http.post(
            "/v1/completions", json={"model": "orders", "prompt": ["a"] * 64, "max_tokens": 1}, headers=e.tenant()
        ),
        400,
        "too_many_prompts",
    ),
    (
        "5000 prompts",
        lambda e, _: e.http.post(
            "/v1/completions", json={"model": "orders", "prompt": ["a"] * 5000, "max_tokens": 1}, headers=e.tenant()
        ),
        400,
        "too_many_prompts",
    ),
    (
        "16 prompts times n 16",
        lambda e, _: e.http.post(
            "/v1/completions",
            json={"model": "orders", "prompt": ["a"] * 16, "n": 16, "max_tokens": 1},
            headers=e.tenant(),
        ),
        400,
        "too_many_sequences",
    ),
    (
        "129 tools",
        lambda e, _: e.chat(
            model="toolcall", tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
        ),
        422,
        "invalid_field",
    ),
    (
        "tools whose combined schema is too big",
        lambda e, _: e.chat(
            model="toolcall",
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": f"f{i}",
                        "parameters": {
                            "type": "object",
                            "properties": {f"p{j}": {"type": "string", "description": "x" * 60} for j in range(9)},
                        },
                    },
                }
                for i in range(120)
            ],
        ),
        400,
        "schema_refused",
    ),
    (
        "a tool schema with a hostile pattern",
        lambda e, _: e.chat(
            model="toolcall", tools=[{"type": "function", "function": {"name": "f", "parameters": HOSTILE_PATTERN}}]
        ),
        400,
        "schema_refused",
    ),
    (
        "a pattern RE2 cannot run",
        lambda e, _: e.chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^(?=.*1)[0-9]+$"}},
            }
        ),
        400,
        "schema_refused",
    ),
    ("unknown route", lambda e, _: e.http.post("/v1/embeddings", json={}, headers=e.tenant()), 404, None),
    ("path trick", lambda e, _: e.http.get("/v1/%2e%2e/admin/tenants", headers=e.tenant()), 404, None),
    ("wrong method", lambda e, _: e.http.get(CHAT, headers=e.tenant()), 405, None),
    # -- the admin API ------------------------------------------------------------------------------------------
    (
        "admin route with a tenant key",
        lambda e, _: e.http.get("/admin/tenants", headers=e.tenant()),
        401,
        "invalid_admin_key",
    ),
    (
        "tenant name invalid",
        lambda e, _: e.http.post("/admin/tenants", json={"name": "Bad Name!"}, headers=e.admin),
        422,
        "invalid_field",
    ),
    (
        "tenant exists",
        lambda e, _: e.http.post("/admin/tenants", json={"name": "acme"}, headers=e.admin),
        400,
        "tenant_refused",
    ),
    (
        "admin POST with a form body",
        lambda e, _: e.http.post("/admin/tenants/acme/keys", data={"rotate": "true"}, headers=e.admin),
        415,
        "json_body_required",
    ),
    (
        "admin POST with no body",
        lambda e, _: e.http.post("/admin/tenants/acme/keys", headers=e.admin),
        400,
        "json_body_required",
    ),
    (
        "limits out of range",
        lambda e, _: e.http.patch("/admin/tenants/acme", json={"limits": {"requests_per_minute": -5}}, headers=e.admin),
        422,
        "invalid_field",
    ),
    (
        "grant to no tenant",
        lambda e, _: e.http.put("/admin/tenants/nobody/grants/orders", headers=e.admin),
        404,
        "tenant_not_found",
    ),
    (
        "promote a version that does not exist",
        lambda e, _: e.http.post("/admin/adapters/orders/promote", json={"version": 99}, headers=e.admin),
        404,
        "adapter_not_found",
    ),
    (
        "alias policy with a hostile schema",
        lambda e, _: e.http.put(
            "/admin/aliases/orders/policy", json={"default_schema": HOSTILE_PATTERN}, headers=e.admin
        ),
        400,
        "schema_refused",
    ),
    # -- publishing -------------------------------------------------------------------------------------------
    (
        "pickle weights",
        lambda e, a: e.http.post(
            "/admin/adapters/bad/versions", headers=e.admin, json={"path": e.import_copy("pickled", a, _pickle_weights)}
        ),
        400,
        "adapter_refused",
    ),
    (
        "another base model",
        lambda e, a: e.http.post(
            "/admin/adapters/bad/versions",
            headers=e.admin,
            json={
                "path": e.import_copy("other-base", a, _edit_json("lorafleet.json", **{"base_model.sha256": "0" * 64}))
            },
        ),
        400,
        "adapter_refused",
    ),
    (
        "rank above the engine's max",
        lambda e, a: e.http.post(
            "/admin/adapters/bad/versions",
            headers=e.admin,
            json={"path": e.import_copy("rank", a, _edit_json("adapter_config.json", r=1024))},
        ),
        400,
        "adapter_refused",
    ),
    (
        "modules_to_save",
        lambda e, a: e.http.post(
            "/admin/adapters/bad/versions",
            headers=e.admin,
            json={"path": e.import_copy("mts", a, _edit_json("adapter_config.json", modules_to_save=["lm_head"]))},
        ),
        400,
        "adapter_refused",
    ),
    (
        "path outside the import root",
        lambda e, _: e.http.post("/admin/adapters/bad/versions", headers=e.admin, json={"path": "/etc"}),
        400,
        "outside_import_root",
    ),
    (
        "archive escaping with ../",
        lambda e, _: e.http.post(
            "/admin/adapters/bad/versions",
            content=tar_of({"../evil.txt": b"x"}),
            headers=e.admin | {"content-type": "application/gzip"},
        ),
        400,
        "archive_refused",
    ),
    (
        "not an archive",
        lambda e, _: e.http.post(
            "/admin/adapters/bad/versions",
            content=b"PK\x03\x04garbage",
            headers=e.admin | {"content-type": "application/zip"},
        ),
        400,
        "archive_refused",
    ),
    (
        "invalid alias",
        lambda e, _: e.http.post("/admin/adapters/Bad Alias/versions", headers=e.admin, json={"path": "x"}),
        400,
        "invalid_alias",
    ),
]


@dataclass
class Bystander:
    """Tenant "other" streaming from its own alias in a loop, while the catalogue runs."""

    done: threading.Event = field(default_factory=threading.Event)
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None


@pytest.fixture(scope="module")
def bystander(env: Env) -> Iterator[Bystander]:
    state = Bystander()

    def loop() -> None:
        body = {
            "model": "secret",
            "messages": [{"role": "user", "content": "order 1"}],
            "max_tokens": 48,
            "stream": True,
        }  # long enough to be in flight through many cases
        with httpx.Client(base_url=env.gw.url, timeout=120) as http:
            while not state.done.is_set():
                try:
                    with http.stream("POST", CHAT, json=body, headers=env.tenant(env.other_key)) as resp:
                        text = resp.read().decode()
                    if resp.status_code != 200 or '"error"' in text or not text.rstrip().endswith("data: [DONE]"):
                        state.failures.append(f"{resp.status_code}: {text[-300:]}")
                    else:
                        state.completed += 1
                except Exception as exc:  # whatever it is, it is a failure to report, not a dead thread
                    state.failures.append(repr(exc))

    state.thread = threading.Thread(target=loop, daemon=True)
    state.thread.start()
    yield state
    state.done.set()
    state.thread.join(timeout=120)


@pytest.mark.parametrize(("name", "send", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_harms_nothing(
    env: Env,
    bystander: Bystander,
    tiny_adapter: Path,
    name: str,
    send: Callable[[Env, Path], httpx.Response],
    status: int,
    code: str | None,
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


def test_after_the_catalogue_the_engine_still_answers_and_the_store_is_clean(env: Env, bystander: Bystander) -> None:
    assert len(CASES) >= 50
    bystander.done.set()
    assert bystander.thread is not None
    bystander.thread.join(timeout=120)
    # the other tenant's streams ran through the whole catalogue, none disturbed
    assert bystander.failures == [] and bystander.completed >= 1, (bystander.failures, bystander.completed)
    assert env.chat(max_tokens=4).status_code == 200
    store = AdapterStore(env.gw.running.data_dir / "adapters")
    assert "bad" not in store.aliases()  # no refused publish left a version behind
    assert not any((store.root / ".staging").iterdir()) if (store.root / ".staging").exists() else True


def _generated_tokens(env: Env) -> float:
    text = httpx.get(f"{env.gw.engine_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")
    )


def test_another_tenants_alias_costs_the_engine_nothing(env: Env) -> None:
    before = _generated_tokens(env)
    resp = env.chat(model="secret", max_tokens=50)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert _generated_tokens(env) == before  # refused before the engine: zero tokens generated
    other = env.http.get("/v1/models", headers=env.tenant()).json()
    assert "secret" not in [m["id"] for m in other["data"]]


def test_a_schema_the_engine_cannot_enforce_is_served_and_checked_by_the_gateway(env: Env) -> None:
    # vLLM hands a schema with what xgrammar lacks (uniqueItems) to llguidance, which leaves keywords
    # unimplemented (uniqueItems itself, "not"): the gateway sends the request again without the constraint,
    # checks the answer itself, and says so (header and body), instead of relaying vLLM's 400.
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "a": {"not": {"type": "string"}},
        },
        "required": ["a"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for stream in (False, True):
        resp = env.chat(response_format=fmt, max_tokens=8, stream=stream)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-lorafleet-json-mode"] == "validate"
        unenforced = resp.headers["x-lorafleet-json-unenforced"].split(",")
        assert unenforced and set(unenforced) <= {"uniqueItems", "not"}, resp.headers
        verdict = resp.text if stream else json.dumps(resp.json()["lorafleet"])
        assert f'"unenforced_keywords": {json.dumps(unenforced)}' in verdict
