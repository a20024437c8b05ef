"""The gateway's HTTP client for vLLM (``VLLMEngine``) against a local aiohttp server that plays the engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from lorafleet.launch import free_port
from serving.config import GatewaySettings
from serving.engines.protocol import EngineError
from serving.engines.vllm import VLLMEngine
from tests.conftest import serve

Run = Callable[[Callable[[VLLMEngine], Awaitable[None]]], None]


class PlayedEngine:
    """What the engine side saw: request bodies and headers, and whether a stream's client went away."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.bodies: list[dict] = []
        self.request_ids: list[str | None] = []
        self.release = asyncio.Event()  # the stream's second event waits for this
        self.client_gone = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_get("/health", self.health)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.raw.append(await request.read())
        self.bodies.append(json.loads(self.raw[-1]))
        self.request_ids.append(request.headers.get("X-Request-Id"))
        if request.query.get("cut"):  # headers, one event, then the connection drops mid-body
            resp = web.StreamResponse(headers={"Content-Length": "1000"})
            await resp.prepare(request)
            await resp.write(b"data: 1\n\n")
            assert request.transport is not None
            request.transport.close()
            return resp
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        while not self.release.is_set():
            if request.transport is None or request.transport.is_closing():
                self.client_gone.set()
                return resp
            await asyncio.sleep(0.01)
        await resp.write(b"data: 2\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def load(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if name == "again":
            return web.Response(status=400, text="The lora adapter 'again' has already been loaded.")
        if name == "bad":
            return web.Response(status=400, text="Invalid LoRA adapter: rank too high")
        return web.Response(text="ok")


@pytest.fixture
def played() -> PlayedEngine:
    return PlayedEngine()


@pytest.fixture
def run(tmp_path: Path, played: PlayedEngine) -> Run:
    """Runs a coroutine with a ``VLLMEngine`` pointed at the played engine (served on a free port)."""

    def go(body: Callable[[VLLMEngine], Awaitable[None]]) -> None:
        async def main() -> None:
            async with serve(played.app()) as url:
                engine = VLLMEngine(GatewaySettings(data_dir=tmp_path, engine_url=url, dev_mode=True))
                try:
                    await body(engine)
                finally:
                    await engine.stop()

        asyncio.run(asyncio.wait_for(main(), timeout=30))

    return go


def test_a_stream_is_relayed_as_it_arrives_and_the_write_is_reported(run: Run, played: PlayedEngine) -> None:
    async def body(engine: VLLMEngine) -> None:
        sent: list[bool] = []
        body = {"model": "orders@1", "messages": [{"role": "user", "content": "héllo"}], "stream": True}
        resp = await engine.send(
            "/v1/chat/completions", body, stream=True, request_id="r-1", on_sent=lambda: sent.append(True)
        )
        assert resp.status_code == 200 and sent == [True]  # written once, before the answer's headers came back
        chunks = resp.aiter_bytes()
        assert await anext(chunks) == b"data: 1\n\n"  # the first event arrives while the second is held back
        played.release.set()
        rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"data: 2\n\ndata: [DONE]\n\n"
        await resp.aclose()
        assert played.bodies == [body] and played.request_ids == ["r-1"]

    run(body)


def test_closing_a_stream_early_hangs_up_on_the_engine(run: Run, played: PlayedEngine) -> None:
    # vLLM aborts a generation whose client hangs up: closing must close the connection, not pool it.
    async def body(engine: VLLMEngine) -> None:
        resp = await engine.send("/v1/chat/completions", {"stream": True}, stream=True)
        assert await anext(resp.aiter_bytes()) == b"data: 1\n\n"
        await resp.aclose()
        await asyncio.wait_for(played.client_gone.wait(), timeout=5)

    run(body)


def test_a_stream_cut_off_mid_body_is_an_engine_error(run: Run, played: PlayedEngine) -> None:
    async def body(engine: VLLMEngine) -> None:
        resp = await engine.send("/v1/chat/completions?cut=1", {"stream": True}, stream=True)
        assert resp.status_code == 200  # the engine URL's trailing slash (see ``serve``) is not doubled
        with pytest.raises(EngineError, match="broke off"):
            async for _ in resp.aiter_bytes():
                pass
        await resp.aclose()

    run(body)


def test_adapter_loads_report_the_engines_refusal_and_accept_a_repeat(run: Run, tmp_path: Path) -> None:
    async def body(engine: VLLMEngine) -> None:
        await engine.load_adapter("orders@1", tmp_path)
        await engine.load_adapter("again", tmp_path)  # vLLM already has it: fine
        with pytest.raises(EngineError, match="vLLM refused adapter bad: 400 Invalid LoRA adapter: rank too high"):
            await engine.load_adapter("bad", tmp_path)
        assert await engine._healthy()

    run(body)


def test_an_unreachable_engine_is_an_engine_error_not_a_crash(tmp_path: Path) -> None:
    async def main() -> None:
        engine = VLLMEngine(
            GatewaySettings(data_dir=tmp_path, engine_url=f"http://127.0.0.1:{free_port()}", dev_mode=True)
        )
        try:
            assert not await engine._healthy()
            with pytest.raises(EngineError, match="engine unreachable"):
                await engine.send("/v1/chat/completions", {}, stream=False)
            with pytest.raises(EngineError, match="engine unreachable"):
                await engine.load_adapter("orders@1", tmp_path)
            with pytest.raises(EngineError, match="engine metrics unreachable"):
                await engine.metrics()
        finally:
            await engine.stop()

    asyncio.run(main())


def test_request_bodies_are_compact_utf8_json(run: Run, played: PlayedEngine) -> None:
    async def body(engine: VLLMEngine) -> None:
        resp = await engine.send("/v1/chat/completions?cut=1", {"a": "é", "b": [1, 2]}, stream=False)
        await resp.aclose()
        assert played.raw == ['{"a":"é","b":[1,2]}'.encode()]

    run(body)


def test_an_external_engine_gets_its_key_on_every_call(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.path == "/v1/chat/completions":
            return web.json_response({"choices": []})
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            app.router.add_post(path, record)
        async with serve(app) as url:
            settings = GatewaySettings(data_dir=tmp_path, engine_url=url, engine_key="engine-secret", dev_mode=True)
            engine = VLLMEngine(settings)
            try:
                await engine.load_adapter("a@1", tmp_path)
                await (await engine.send("/v1/chat/completions", {"model": "a@1"}, stream=False)).aclose()
                await engine.unload_adapter("a@1")
            finally:
                await engine.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert seen == ["Bearer engine-secret"] * 3


def test_the_supervised_engine_inherits_no_gateway_secret(tmp_path: Path) -> None:
    from serving.engines.vllm import child_env, vllm_command

    settings = GatewaySettings(data_dir=tmp_path, admin_key="admin-key-0123456789abcdef")
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/home/x",
        "HF_HOME": "/h",
        "OMP_NUM_THREADS": "2",
        "LC_ALL": "C",
        "LORAFLEET_ADMIN_KEY": "admin-key-0123456789abcdef",
        "LORAFLEET_STATE_URL": "postgresql://u:pw@db/x",
        "AWS_SECRET_ACCESS_KEY": "s3",
        "VLLM_API_KEY": "a-users-own",
    }
    env = child_env(settings, "fresh-key", environ)
    assert {k: env[k] for k in ("PATH", "HOME", "HF_HOME", "OMP_NUM_THREADS", "LC_ALL")} == {
        k: environ[k] for k in ("PATH", "HOME", "HF_HOME", "OMP_NUM_THREADS", "LC_ALL")
    }
    assert not any(k.startswith("AWS_") for k in env)
    # Of lorafleet's settings, only the one its vLLM plugin reads in the engine's processes.
    assert {k: v for k, v in env.items() if k.startswith("LORAFLEET_")} == {"LORAFLEET_LORA_OPS": "grouped"}
    assert env["VLLM_API_KEY"] == "fresh-key"  # its own key, through the environment...
    assert "fresh-key" not in vllm_command(settings) and "--api-key" not in vllm_command(settings)  # ...not argv


def test_the_removed_compact_setting_is_refused_with_its_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_JSON_COMPACT", "true")
    with pytest.raises(ValueError, match="LORAFLEET_JSON_COMPACT was replaced by LORAFLEET_JSON_WHITESPACE"):
        GatewaySettings(data_dir=tmp_path, admin_key="admin-key-0123456789abcdef")


def test_every_engine_gets_the_structured_outputs_settings(tmp_path: Path) -> None:
    from serving.engines.vllm import vllm_command

    def config(**env: object) -> dict:
        settings = GatewaySettings(data_dir=tmp_path, admin_key="admin-key-0123456789abcdef", **env)  # type: ignore[arg-type]
        command = vllm_command(settings)
        return json.loads(command[command.index("--structured-outputs-config") + 1])

    assert config() == {"backend": "guidance", "disable_any_whitespace": False}  # spaced: per request (x-guidance)
    assert config(json_whitespace="compact") == {"backend": "guidance", "disable_any_whitespace": True}
    compact = config(json_backend="xgrammar", json_whitespace="compact")
    assert compact == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert config(json_backend="auto", json_whitespace="any") == {"backend": "auto", "disable_any_whitespace": False}
    refused = {
        ("xgrammar", "spaced"): "LORAFLEET_JSON_WHITESPACE=spaced needs LORAFLEET_JSON_BACKEND=guidance",
        ("auto", "spaced"): "LORAFLEET_JSON_WHITESPACE=spaced needs LORAFLEET_JSON_BACKEND=guidance",
        ("auto", "compact"): "LORAFLEET_JSON_WHITESPACE=compact needs LORAFLEET_JSON_BACKEND=guidance or xgrammar",
    }
    for (backend, whitespace), says in refused.items():
        with pytest.raises(ValueError, match=says):
            config(json_backend=backend, json_whitespace=whitespace)
