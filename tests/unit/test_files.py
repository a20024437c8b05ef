"""OpenAI's files API through the official openai client: upload, list, retrieve, content, delete, per tenant;
the limits (per file, per tenant) and bad uploads refused with nothing left behind."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.tenants import TenantStore
from tests.fakes import ADMIN_KEY, FakeEngine, asgi_scope, assert_openai_error, fake_base

LINES = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{}"}]}\n'


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], GatewaySettings]]:
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        max_file_bytes=4096,
        file_quota_bytes=8192,
    )
    tenants = TenantStore(settings.state_url)
    keys = {name: tenants.issue_key(tenants.create(name)) for name in ("acme", "other")}
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        yield client, keys, settings


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    """The official client, talking to the app in this process."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def left_on_disk(settings: GatewaySettings) -> list[str]:
    root = settings.data_dir / "files"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_file_goes_up_lists_reads_back_and_goes(gw) -> None:
    client, keys, settings = gw
    acme = sdk(client, keys["acme"])
    first = acme.files.create(file=("train.jsonl", io.BytesIO(LINES * 3)), purpose="fine-tune")
    assert (first.object, first.purpose, first.filename, first.bytes, first.status) == (
        "file",
        "fine-tune",
        "train.jsonl",
        len(LINES) * 3,
        "processed",
    )
    assert first.id.startswith("file-") and first.created_at > 0
    second = acme.files.create(file=("val.jsonl", io.BytesIO(LINES)), purpose="fine-tune")
    assert acme.files.retrieve(first.id) == first
    assert acme.files.content(first.id).content == LINES * 3
    assert {f.id for f in acme.files.list()} == {first.id, second.id}
    page = acme.files.list(limit=1, order="asc")
    assert [f.id for f in page.data] == [first.id] and page.has_more
    assert [f.id for f in acme.files.list(limit=1, order="asc", after=first.id).data] == [second.id]
    assert [f.id for f in acme.files.list(limit=1, order="asc")] == [first.id, second.id]  # the SDK pages on
    deleted = acme.files.delete(first.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (first.id, True, "file")
    with pytest.raises(openai.NotFoundError) as gone:
        acme.files.retrieve(first.id)
    assert gone.value.code == "file_not_found"
    assert left_on_disk(settings) == [f"{client.app.state.gateway.tenants.get('acme').id}/{second.id}"]  # type: ignore[attr-defined]


def test_another_tenants_file_is_a_404_like_a_missing_one(gw) -> None:
    client, keys, _ = gw
    mine = sdk(client, keys["acme"]).files.create(file=("a.jsonl", io.BytesIO(LINES)), purpose="fine-tune")
    theirs = sdk(client, keys["other"])
    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as refused:
            call(mine.id)
        assert refused.value.code == "file_not_found" and "file-nothing" not in str(refused.value)
    with pytest.raises(openai.NotFoundError) as missing:
        theirs.files.retrieve("file-nothing")
    assert missing.value.message.replace("file-nothing", mine.id) == refused.value.message
    assert list(theirs.files.list()) == []


def test_the_limits_refuse_with_the_limit_and_leave_nothing(gw) -> None:
    client, keys, settings = gw
    acme = sdk(client, keys["acme"])
    with pytest.raises(openai.APIStatusError) as large:
        acme.files.create(file=("big.jsonl", io.BytesIO(b"x" * 5000)), purpose="fine-tune")
    assert large.value.status_code == 413 and "4096 bytes" in large.value.message
    acme.files.create(file=("a.jsonl", io.BytesIO(b"x" * 4000)), purpose="fine-tune")
    acme.files.create(file=("b.jsonl", io.BytesIO(b"x" * 4000)), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as quota:
        acme.files.create(file=("c.jsonl", io.BytesIO(b"x" * 1000)), purpose="fine-tune")
    assert quota.value.code == "file_quota_exceeded" and "8192 bytes" in quota.value.message
    assert quota.value.response.headers["x-should-retry"] == "false"  # the client does not send it twice more
    sdk(client, keys["other"]).files.create(file=("a.jsonl", io.BytesIO(b"x" * 1000)), purpose="fine-tune")
    assert len(left_on_disk(settings)) == 3  # the two of acme and the other tenant's: no partial file anywhere


def test_bad_uploads_are_refused_by_name(gw) -> None:
    client, keys, settings = gw
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    wrong = client.post("/v1/files", headers=auth, files={"file": ("a.jsonl", LINES)}, data={"purpose": "vision"})
    assert "fine-tune" in assert_openai_error(wrong, 400, "invalid_file")["message"]
    assert_openai_error(client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"}), 400, "invalid_file")
    assert_openai_error(client.post("/v1/files", headers=auth, json={"purpose": "fine-tune"}), 400, "invalid_file")
    assert_openai_error(client.post("/v1/files", files={"file": ("a.jsonl", LINES)}), 401, "invalid_api_key")
    assert left_on_disk(settings) == []


def test_an_upload_cut_off_midway_leaves_nothing(gw) -> None:
    client, keys, settings = gw
    boundary = "lfboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": head + LINES, "more_body": True}])

    async def receive() -> dict[str, Any]:
        message = next(messages, None)
        return message if message is not None else {"type": "http.disconnect"}  # the client is gone

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        headers = {
            "authorization": f"Bearer {keys['acme']}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        }
        await asyncio.wait_for(client.app(asgi_scope("/v1/files", headers), receive, send), 10)  # type: ignore[arg-type]

    client.portal.call(run)  # type: ignore[union-attr]
    assert left_on_disk(settings) == []
    assert list(sdk(client, keys["acme"]).files.list()) == []


def test_a_record_never_answers_without_its_bytes(gw) -> None:
    client, keys, settings = gw
    acme = sdk(client, keys["acme"])
    made = acme.files.create(file=("a.jsonl", io.BytesIO(LINES)), purpose="fine-tune")
    for path in (settings.data_dir / "files").rglob(made.id):
        path.unlink()  # the bytes lost (a disk replaced, a crash): an error, never a 200 cut short
    with pytest.raises(openai.NotFoundError):
        acme.files.content(made.id)
