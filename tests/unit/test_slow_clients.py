"""Clients that send slowly, or send a lot without a key: the gateway bounds what it reads and how long it waits.

An adapter upload's body is never read before the admin key is checked, and streams to disk; every body has a
time to arrive (408); a connection that takes too long to send its headers is closed (``lorafleet serve``'s
protocol, a real uvicorn server on loopback).
"""

from __future__ import annotations

import asyncio
import io
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from lorafleet.launch import free_port
from serving.app import build_app
from serving.config import GatewaySettings
from serving.http.server import header_deadline
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, asgi_scope, fake_base

UPLOAD = "/admin/adapters/orders/versions"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, str, GatewaySettings]]:
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        body_timeout_s=0.5,
        upload_timeout_s=0.5,
        max_upload_bytes=1 << 20,
    )
    tenants = TenantStore(settings.state_url)
    key = tenants.issue_key(tenants.create("acme"))
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        yield client, key, settings


def call(
    client: TestClient,
    path: str,
    headers: dict[str, str],
    chunks: list[bytes],
    *,
    pause_s: float = 0.0,
    complete: bool = True,
) -> tuple[int, bytes, int]:
    """One request straight into the ASGI app, its body sent in ``chunks`` (``pause_s`` before each after the
    first; the last says the body is complete unless ``complete`` is false), then silence: the status, the
    body, and how many body chunks the app took."""
    taken = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal taken
        if taken < len(chunks):
            if taken:
                await asyncio.sleep(pause_s)
            taken += 1
            return {"type": "http.request", "body": chunks[taken - 1], "more_body": taken < len(chunks) or not complete}
        await asyncio.sleep(3600)  # a client that sends nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        await asyncio.wait_for(client.app(asgi_scope(path, headers), receive, send), 10)  # type: ignore[arg-type]

    client.portal.call(run)  # type: ignore[union-attr]
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if start["status"] >= 400 and taken < len(chunks) + (0 if complete else 1):
        # Refused before its body was in: the connection closes with the answer, or the client could keep it
        # open forever sending the rest a byte at a time.
        assert (b"connection", b"close") in [(k.lower(), v) for k, v in start["headers"]], start["headers"]
    return start["status"], body, taken


def tar_bytes(adapter: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for f in sorted(adapter.iterdir()):
            tar.add(f, arcname=f.name)
    return out.getvalue()


def staging_left(settings: GatewaySettings) -> list[Path]:
    staging = settings.adapters_dir / ".staging"
    return list(staging.iterdir()) if staging.exists() else []


def test_an_upload_without_the_admin_key_is_refused_before_its_body_is_read(gateway) -> None:
    client, key, _ = gateway
    chunks = [b"x" * 65536] * 8
    for auth in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer wrong"}):
        headers = {"content-type": "application/gzip", "content-length": str(8 * 65536), **auth}
        status, body, taken = call(client, UPLOAD, headers, chunks)
        assert (status, taken) == (401, 0), body
        assert b"invalid_admin_key" in body


def test_an_upload_streams_in_and_is_published(gateway, tmp_path: Path) -> None:
    client, _, settings = gateway
    data = tar_bytes(make_adapter(tmp_path / "a"))
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    headers = {"content-type": "application/gzip", "authorization": f"Bearer {ADMIN_KEY}"}  # chunked: no length
    status, body, taken = call(client, UPLOAD, headers, chunks)
    assert status == 201, body
    assert taken == len(chunks) and staging_left(settings) == []


def test_an_upload_over_the_limit_or_too_slow_leaves_nothing(gateway) -> None:
    client, _, settings = gateway
    headers = {"content-type": "application/gzip", "authorization": f"Bearer {ADMIN_KEY}"}
    status, body, taken = call(client, UPLOAD, headers, [b"x" * 65536] * 20)  # 1.25 MiB, chunked
    assert status == 413 and b"body_too_large" in body and taken == 17  # stopped at the first chunk over 1 MiB
    status, body, _ = call(client, UPLOAD, headers, [b"x" * 1024] * 4, pause_s=0.4)  # 1.2 s for a 0.5 s budget
    assert status == 408 and b"request_timeout" in body, body
    assert staging_left(settings) == [] and not (settings.adapters_dir / "orders").exists()


def test_a_body_that_takes_too_long_is_408(gateway) -> None:
    client, key, _ = gateway
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    status, body, taken = call(client, "/v1/chat/completions", headers, [b'{"model": "orders", '], complete=False)
    assert status == 408 and b"request_timeout" in body and taken == 1  # the client never sent the rest


@pytest.fixture(scope="module")
def served() -> Iterator[int]:
    """A real uvicorn server with ``lorafleet serve``'s protocol (a 0.5 s header deadline) on loopback."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":  # longer than the header deadline
            await asyncio.sleep(1.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=header_deadline(0.5), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it sends nothing first)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False


def test_pipelined_requests_are_all_answered_however_their_headers_arrive(served: int) -> None:
    """A request whose headers wait in the buffer behind one being served is not the client's slowness."""
    with socket.create_connection(("127.0.0.1", served)) as pipelined:
        pipelined.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")
        time.sleep(0.2)
        pipelined.sendall(b"Host: x\r\n\r\n")  # the third's headers end after the deadline began
        pipelined.settimeout(10)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 3:
            piece = pipelined.recv(4096)
            assert piece, f"closed after {answers.count(b'HTTP/1.1 200')} answers"
            answers += piece


def test_a_client_slow_to_send_its_headers_is_cut_off(served: int) -> None:
    silent = socket.create_connection(("127.0.0.1", served))
    partial = socket.create_connection(("127.0.0.1", served))
    partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert closed_within(silent, 5) and closed_within(partial, 5)
    with socket.create_connection(("127.0.0.1", served)) as prompt:
        prompt.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        prompt.settimeout(5)
        assert prompt.recv(1024).startswith(b"HTTP/1.1 200")
        time.sleep(0.8)  # idle between requests is the keep-alive timeout's (5 s), not the header deadline's
        prompt.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert prompt.recv(1024).startswith(b"HTTP/1.1 200")
