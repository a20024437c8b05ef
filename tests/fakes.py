"""Test doubles and helpers shared by the gateway's unit tests: a fake vLLM engine, a fake base model, request helpers.

``FakeEngine`` implements ``serving.engines.vllm.Engine`` over an httpx
``MockTransport`` that answers like vLLM's OpenAI server (404 for an adapter it
does not hold, SSE streams with a usage chunk when asked); the gateway under
test runs for real.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from contract.basemodel import BaseModelRecord, write_record
from serving.engines.protocol import BASE_MODEL_NAME, EngineError

ADMIN_KEY = "admin-key-for-tests-0123456789"


class FakeEngine:
    """Implements ``serving.engines.vllm.Engine`` over an httpx MockTransport that plays vLLM."""

    def __init__(self) -> None:
        self.restarts = 0
        self.ready = True
        self.loaded: list[str] = []
        self.requests: list[dict] = []
        self.answer = '{"a": 1}'
        self.answers: dict[str, str] = {}  # per engine-side model name, e.g. {"orders@2": "broken"}
        self.request_ids: list[str | None] = []
        self.refuse: Callable[[dict], httpx.Response | None] | None = None  # a hook: an error answer for a body
        self.unreachable = False  # every call fails to connect, as a dead engine's would
        self.exposition = b""  # what its /metrics says (its load), when set
        self.load_delay = 0.0  # seconds an adapter load takes
        self.answer_delay = 0.0  # seconds before it answers a request (vLLM's whole answers come at the end)
        self.root: str | None = "/models/base-model"  # where it says it loaded its base model from
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle), base_url="http://engine")

    def _handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        refused = self.refuse(body) if self.refuse is not None else None
        if refused is not None:
            return refused
        if body["model"] not in self.loaded and body["model"] != BASE_MODEL_NAME:
            missing = f"The model `{body['model']}` does not exist."  # vLLM's own words
            return httpx.Response(
                404, json={"error": {"message": missing, "type": "NotFoundError", "param": None, "code": 404}}
            )
        answer = self.answers.get(body["model"], self.answer)
        if body.get("stream"):
            return _streamed(body, answer)
        return _whole(request.url.path, body, answer)

    def is_ready(self) -> bool:
        return self.ready

    async def start(self, on_ready: Callable[[], Awaitable[None]]) -> None:
        await on_ready()

    async def stop(self) -> None:
        await self.client.aclose()

    async def load_adapter(self, name: str, path: Path) -> None:
        if self.unreachable:
            raise EngineError("engine unreachable")
        await asyncio.sleep(self.load_delay)
        self.loaded.append(name)

    async def unload_adapter(self, name: str) -> None:
        self.loaded.remove(name)

    async def metrics(self) -> bytes:
        if not self.ready or self.unreachable:
            raise EngineError("engine metrics unreachable")
        if self.exposition:
            return self.exposition
        return (
            b"# HELP vllm:num_requests_running Running requests.\n# TYPE vllm:num_requests_running gauge\n"
            b'vllm:num_requests_running{model_name="base"} 0.0\n'
        )

    async def adapters(self) -> list[str]:
        return sorted(self.loaded)

    async def base_root(self) -> str | None:
        return self.root

    async def send(
        self,
        path: str,
        body: dict,
        *,
        stream: bool,
        request_id: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> httpx.Response:
        if self.unreachable:
            raise EngineError("engine unreachable: connection refused")
        self.request_ids.append(request_id)
        request = self.client.build_request("POST", path, json=body)
        if on_sent is not None:
            on_sent()
        await asyncio.sleep(self.answer_delay)
        return await self.client.send(request, stream=stream)


def _streamed(body: dict, answer: str) -> httpx.Response:
    """vLLM's streamed answer: the text in three chunks, a usage chunk when asked, then [DONE]."""
    third = max(1, len(answer) // 3)
    pieces = [answer[:third], answer[third : 2 * third], answer[2 * third :]]
    chunks = [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": tok},
                    "finish_reason": "stop" if last else None,
                    "stop_reason": None,
                    "token_ids": [1, 2],
                }
            ],
            "prompt_token_ids": [7, 8, 9],
        }
        for tok, last in zip(pieces, (False, False, True), strict=True)
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        chunks.append(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [],
                "usage": usage | {"prompt_tokens_details": None},
                "system_fingerprint": "vllm-0.32.0-fake",
            }
        )
    # vLLM's compact JSON, which the gateway's relay reads
    sse = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


def _whole(path: str, body: dict, answer: str) -> httpx.Response:
    """vLLM's whole answer to a chat or a text completion, with its own fields the gateway must drop."""
    if path == "/v1/completions":
        choice = {"index": 0, "text": answer, "finish_reason": "stop", "stop_reason": None, "prompt_token_ids": [7]}
        return httpx.Response(
            200,
            json={
                "id": "c1",
                "object": "text_completion",
                "model": body["model"],
                "choices": [choice],
                "system_fingerprint": "vllm-0.32.0-fake",
                "kv_transfer_params": None,
            },
        )
    message = {"role": "assistant", "content": answer}
    return httpx.Response(
        200,
        json={
            "id": "c1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message | {"reasoning": None},
                    "finish_reason": "stop",
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            "system_fingerprint": "vllm-0.32.0-fake",
            "prompt_token_ids": [7, 8, 9],
            "kv_transfer_params": None,
        },
    )


def fake_base(tmp_path: Path) -> Path:
    """A base model directory with its identity record and layer sizes, no weights: fit checks run for real."""
    base = tmp_path / "base-model"
    base.mkdir()
    write_record(base, BaseModelRecord(name="m", sha256="ab", source="test"))
    config = {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
    }
    (base / "config.json").write_text(json.dumps(config))
    return base


def chat(client: TestClient, key: str | None, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "orders", "messages": [{"role": "user", "content": "hi"}]} | body
    return client.post("/v1/chat/completions", json=payload, headers=headers)


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


def tar_of(files: dict[str, bytes], *, link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def leave_after(client: TestClient, key: str, body: dict, seconds: float) -> int:
    """One request straight into the ASGI app whose client hangs up ``seconds`` after sending it (TestClient
    cannot): the status the gateway answered with (499 when it saw the client go first)."""
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}])

    async def receive() -> dict:
        message = next(messages, None)
        if message is not None:
            return message
        await asyncio.sleep(seconds)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        await client.app(asgi_scope("/v1/chat/completions", headers), receive, send)  # type: ignore[arg-type]

    client.portal.call(run)  # type: ignore[union-attr]
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def asgi_scope(path: str, headers: dict[str, str], method: str = "POST") -> dict[str, Any]:
    """An HTTP request's ASGI scope, for driving the app by hand (its body and a client's disconnect included)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
