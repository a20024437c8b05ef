"""The console over HTTP (a fake engine): signing in, the key's cookie, CSRF on every state-changing form, and a
tenant's console showing nothing of another tenant. The pages in a real browser: tests/e2e/test_rollout_e2e.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.config import GatewaySettings
from serving.http.routes.console import KEY_COOKIE, csrf_token, loss_chart
from tests.fakes import ADMIN_KEY
from tests.unit.test_fine_tuning import sdk, two_tenants, upload


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], GatewaySettings]]:
    yield from two_tenants(tmp_path)


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; the page's CSRF token."""
    form = client.get("/console/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    signed = client.post("/console/login", data={"key": key, "csrf": token}, follow_redirects=False)
    assert signed.status_code == 303, signed.text
    home = client.get("/console")
    return re.search(r'name="csrf" value="([^"]+)"', home.text).group(1)  # type: ignore[union-attr]


def test_signing_in_puts_the_key_in_an_httponly_samesite_strict_cookie(gw) -> None:
    client, keys, _ = gw
    assert client.get("/console", follow_redirects=False).headers["location"] == "/console/login"
    form = client.get("/console/login")
    assert "<script" not in form.text
    policy = form.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    forged = client.post("/console/login", data={"key": keys["acme"], "csrf": "guessed"}, follow_redirects=False)
    assert forged.status_code == 403 and KEY_COOKIE not in forged.headers.get("set-cookie", "")
    wrong = client.post("/console/login", data={"key": "lf-not-a-key", "csrf": token}, follow_redirects=False)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    token = re.search(r'name="csrf" value="([^"]+)"', wrong.text).group(1)  # type: ignore[union-attr]
    signed = client.post("/console/login", data={"key": keys["acme"], "csrf": token}, follow_redirects=False)
    cookie = signed.headers["set-cookie"]
    assert signed.status_code == 303 and cookie.startswith(f"{KEY_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    home = client.get("/console")
    assert home.status_code == 200 and "<h1>acme</h1>" in home.text and home.headers["cache-control"] == "no-store"


def test_a_tenants_console_shows_its_own_jobs_and_never_another_tenants(gw) -> None:
    client, keys, _ = gw
    acme, other = sdk(client, keys["acme"]), sdk(client, keys["other"])
    mine = acme.fine_tuning.jobs.create(model="base-model", training_file=upload(acme))
    theirs = other.fine_tuning.jobs.create(model="base-model", training_file=upload(other))
    sign_in(client, keys["acme"])
    home = client.get("/console").text
    assert mine.id in home and theirs.id not in home and "other" not in home
    assert client.get(f"/console/jobs/{mine.id}").status_code == 200
    assert client.get(f"/console/jobs/{theirs.id}").status_code == 404  # like a missing one
    assert client.get("/console/canaries/someone-elses").status_code == 404
    client.cookies.clear()
    sign_in(client, ADMIN_KEY)
    operator = client.get("/console").text
    assert mine.id in operator and theirs.id in operator and "other" in operator and 'id="engines"' in operator


def test_every_state_changing_form_needs_the_pages_csrf_token(gw) -> None:
    client, keys, _ = gw
    acme = sdk(client, keys["acme"])
    job = acme.fine_tuning.jobs.create(model="base-model", training_file=upload(acme))
    token = sign_in(client, keys["acme"])
    for forged in ({}, {"csrf": "0" * 40}, {"csrf": _token_of(client, keys["other"])}):
        refused = client.post(f"/console/jobs/{job.id}/cancel", data=forged, follow_redirects=False)
        assert refused.status_code == 403, forged
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "validating_files"  # nothing happened
    done = client.post(f"/console/jobs/{job.id}/cancel", data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303 and acme.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.post("/console/logout", data={}, follow_redirects=False).status_code == 403
    out = client.post("/console/logout", data={"csrf": token}, follow_redirects=False)
    assert out.status_code == 303 and 'lorafleet_console=""' in out.headers["set-cookie"]


def _token_of(client: TestClient, key: str) -> str:
    """Another tenant's valid page token (what its own console's forms carry)."""
    return csrf_token(client.app.state.gateway, key)  # type: ignore[attr-defined]


def test_the_loss_chart_draws_each_logged_step_once() -> None:
    events: list[dict[str, Any]] = [  # newest first, as the store lists them
        {"type": "metrics", "data": {"step": 4, "train_loss": 0.5, "valid_loss": 0.6}},
        {"type": "message", "data": None},
        {"type": "metrics", "data": {"step": 2, "train_loss": 0.9}},
        {"type": "metrics", "data": {"step": 2, "train_loss": 0.9}},  # a resumed run logs a step again
    ]
    svg = str(loss_chart(events))
    assert 'data-series="train_loss" data-points="2"' in svg and 'data-series="valid_loss" data-points="1"' in svg
    assert "<script" not in svg


def test_a_canary_page_is_a_tenants_only_for_an_alias_granted_to_it_alone(gw) -> None:
    from serving.canary.analysis import CanaryConfig

    client, keys, _ = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme, other = gateway.tenants.get("acme"), gateway.tenants.get("other")
    for alias, holders in (("mine", [acme]), ("shared", [acme, other])):
        for tenant in holders:
            gateway.tenants.grant(tenant, alias)
        canary = gateway.canaries.records.insert(alias, 2, 1, CanaryConfig(), False)
        gateway.canaries.records.event(canary, "start", "by hand", None, "operator-jane")
    sign_in(client, keys["acme"])
    mine = client.get("/console/canaries/mine")
    assert mine.status_code == 200 and "by hand" in mine.text and "operator-jane" not in mine.text
    assert client.get("/console/canaries/shared").status_code == 404  # every tenant's traffic: not acme's to see
    client.cookies.clear()
    sign_in(client, ADMIN_KEY)
    assert "operator-jane" in client.get("/console/canaries/shared").text
