"""The console: server-rendered pages for the people who would rather look than read JSON.

    GET  /console                       a tenant: its jobs, aliases and canaries; the admin: tenants, engines, queue
    GET  /console/jobs/{id}             a job: its loss curves, gate table, rollout and events
    GET  /console/canaries/{alias}      a canary: each metric, stable against the candidate, over time
    GET  /console/login                 sign in with a key (a tenant's, or the admin key)
    POST /console/login | /logout       (with the form's CSRF token)
    POST /console/jobs/{id}/cancel      (with the page's CSRF token)

Signing in puts the key in a cookie the page's scripts cannot read (HttpOnly),
that no other site's page or form sends (SameSite=Strict), Secure behind
HTTPS, scoped to ``/console``. Every state-changing action is a POST carrying
a CSRF token: an HMAC of the key (``csrf_token``), so any gateway of several
checks it. The sign-in form has its own token, double-submitted as a cookie.
Pages answer with a strict Content-Security-Policy: no script at all, styles
by nonce, charts are inline SVG (``serving.http.charts``).

A tenant's console shows its own jobs, the aliases granted to it and their
versions, and the canaries of the aliases granted to it alone (a shared alias's
canary counts every tenant's traffic); never another tenant's name or job, nor
who decided a canary step (an operator, another job).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from serving.canary.state import ACTIVE
from serving.gateway import Gateway
from serving.http.charts import line_chart
from serving.http.deps import StateDep
from serving.plan import BASE_ALIAS
from serving.state.jobs import ENDED, JobError
from serving.state.tenants import Tenant

router = APIRouter(prefix="/console", include_in_schema=False)

KEY_COOKIE, LOGIN_COOKIE = "lorafleet_console", "lorafleet_console_login"
SESSION_S = 8 * 3600
TEMPLATES = Environment(loader=PackageLoader("serving.http", "templates"), autoescape=select_autoescape(["html"]))
_PROCESS_SECRET = secrets.token_bytes(32)  # without an admin key (development): this process's own


@dataclass(frozen=True)
class Viewer:
    """Who signed in: a tenant, or the operator (the admin key)."""

    key: str
    tenant: Tenant | None

    @property
    def admin(self) -> bool:
        return self.tenant is None


def csrf_token(state: Gateway, key: str) -> str:
    """The token a signed-in page's forms carry: an HMAC of the key under a secret every gateway shares."""
    admin = state.settings.admin_key.get_secret_value() if state.settings.admin_key else ""
    secret = hashlib.sha256(b"lorafleet-console:" + admin.encode()).digest() if admin else _PROCESS_SECRET
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:40]


def _token_ok(state: Gateway, viewer: Viewer, csrf: str) -> bool:
    """Whether a form carried the token of the page it came from (compared in constant time)."""
    return hmac.compare_digest(csrf_token(state, viewer.key).encode(), csrf.encode())


async def viewer_of(request: Request, state: Gateway) -> Viewer | None:
    return await identify(state, request.cookies.get(KEY_COOKIE, ""))


async def identify(state: Gateway, key: str) -> Viewer | None:
    """The admin key or a tenant's key; ``None`` for anything else."""
    if not key:
        return None
    admin = state.settings.admin_key.get_secret_value() if state.settings.admin_key else ""
    if admin and hmac.compare_digest(key.encode(), admin.encode()):
        return Viewer(key, None)
    tenant = await state.tenants.aauthenticate(key)
    return Viewer(key, tenant) if tenant is not None else None


def page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """A rendered page with the console's headers: no caching, no framing, no script, styles by nonce."""
    nonce = secrets.token_urlsafe(16)
    html = TEMPLATES.get_template(template).render(nonce=nonce, when=_when, **values)
    response = HTMLResponse(html, status_code=status)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


def _to_login() -> RedirectResponse:
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(KEY_COOKIE, path="/console")
    return response


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _forbidden(request: Request, what: str) -> HTMLResponse:
    return page(request, "console/error.html", status=403, message=f"{what} (a page or form from elsewhere?)")


# -- signing in and out -------------------------------------------------------------------------------------


@router.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = page(request, "console/login.html", csrf=token, error=None)
    _cookie(response, request, LOGIN_COOKIE, token, 600)
    return response


@router.post("/login", response_model=None)
async def login(request: Request, state: StateDep, key: str = Form(""), csrf: str = Form("")) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf.encode()):
        return _forbidden(request, "The sign-in form's token did not match")
    if await identify(state, key.strip()) is None:
        token = secrets.token_urlsafe(24)
        refused = page(request, "console/login.html", status=401, csrf=token, error="That key is not valid here.")
        _cookie(refused, request, LOGIN_COOKIE, token, 600)
        return refused
    response = RedirectResponse("/console", status_code=303)
    _cookie(response, request, KEY_COOKIE, key.strip(), SESSION_S)
    response.delete_cookie(LOGIN_COOKIE, path="/console")
    return response


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure behind HTTPS."""
    response.set_cookie(
        name, value, max_age=max_age, path="/console", httponly=True, samesite="strict", secure=_secure(request)
    )


@router.post("/logout", response_model=None)
async def logout(request: Request, state: StateDep, csrf: str = Form("")) -> Response:
    viewer = await viewer_of(request, state)
    if viewer is not None and not _token_ok(state, viewer, csrf):
        return _forbidden(request, "The form's token did not match")
    return _to_login()


# -- pages -------------------------------------------------------------------------------------------------


@router.get("", response_model=None)
async def home(request: Request, state: StateDep) -> Response:
    viewer = await viewer_of(request, state)
    if viewer is None:
        return _to_login()
    csrf = csrf_token(state, viewer.key)
    if viewer.admin:
        overview = await asyncio.to_thread(_operator_overview, state)
        return page(request, "console/admin.html", csrf=csrf, viewer=viewer, **overview)
    assert viewer.tenant is not None
    overview = await asyncio.to_thread(_tenant_overview, state, viewer.tenant)
    return page(request, "console/tenant.html", csrf=csrf, viewer=viewer, **overview)


@router.get("/jobs/{job_id}", response_model=None)
async def job_page(job_id: str, request: Request, state: StateDep) -> Response:
    viewer = await viewer_of(request, state)
    if viewer is None:
        return _to_login()
    try:
        job = await asyncio.to_thread(state.jobs.get, viewer.tenant.id if viewer.tenant else None, job_id)
    except JobError:
        return page(request, "console/error.html", status=404, message=f"No job {job_id} of yours.")
    events, _ = await asyncio.to_thread(state.jobs.events, None, job.id, None, 1000)
    return page(
        request,
        "console/job.html",
        csrf=csrf_token(state, viewer.key),
        viewer=viewer,
        job=job,
        ended=job.status in ENDED,
        curves=loss_chart(events),
        events=events[:200],
        rollout=job.rollout,
    )


@router.get("/canaries/{alias}", response_model=None)
async def canary_page(alias: str, request: Request, state: StateDep) -> Response:
    viewer = await viewer_of(request, state)
    if viewer is None:
        return _to_login()
    if viewer.tenant is not None and not await asyncio.to_thread(_alone, state, viewer.tenant, alias):
        return page(request, "console/error.html", status=404, message=f"No alias {alias} of yours alone.")
    canary = await asyncio.to_thread(state.canaries.records.latest, alias)
    if canary is None:
        return page(request, "console/error.html", status=404, message=f"{alias} has had no canary.")
    events = await asyncio.to_thread(state.canaries.records.events_of, canary.id)
    return page(
        request,
        "console/canary.html",
        csrf=csrf_token(state, viewer.key),
        viewer=viewer,
        canary=canary.as_dict(),
        charts=canary_charts(events),
        events=events,
        show_actors=viewer.admin,  # an operator's name, another job's id: the operator's to see
    )


@router.post("/jobs/{job_id}/cancel", response_model=None)
async def cancel_job(job_id: str, request: Request, state: StateDep, csrf: str = Form("")) -> Response:
    viewer = await viewer_of(request, state)
    if viewer is None:
        return _to_login()
    if not _token_ok(state, viewer, csrf):
        return _forbidden(request, "The form's token did not match")
    try:
        await asyncio.to_thread(state.jobs.cancel, viewer.tenant.id if viewer.tenant else None, job_id)
    except JobError as exc:
        return page(request, "console/error.html", status=409, message=str(exc))
    return RedirectResponse(f"/console/jobs/{job_id}", status_code=303)


# -- what the pages show -----------------------------------------------------------------------------------


def loss_chart(events: list[dict[str, Any]]) -> Any:
    """The training and validation loss over the steps, from the job's metrics events."""
    points: dict[str, dict[float, float]] = {"train_loss": {}, "valid_loss": {}}
    for event in events:  # newest first: a step logged again (a resumed run) shows its newest value
        data = event.get("data") or {}
        if event.get("type") != "metrics" or "step" not in data:
            continue
        for name, seen in points.items():
            if name in data:
                seen.setdefault(float(data["step"]), float(data[name]))
    series = {name: sorted(seen.items()) for name, seen in points.items()}
    return line_chart(series, title="loss", x_label="step", y_label="loss")


def canary_charts(events: list[dict[str, Any]]) -> list[Any]:
    """One chart per metric the canary judged: stable's value and the candidate's, at each analysis."""
    per_metric: dict[str, dict[str, list[tuple[float, float]]]] = {}
    start = events[0]["at"] if events else 0.0
    for event in events:
        for metric in ((event.get("numbers") or {}).get("analysis") or {}).get("metrics") or []:
            if metric.get("stable") is None or metric.get("canary") is None:
                continue
            lines = per_metric.setdefault(metric["metric"], {"stable": [], "candidate": []})
            t = round(event["at"] - start, 1)
            lines["stable"].append((t, float(metric["stable"])))
            lines["candidate"].append((t, float(metric["canary"])))
    return [
        line_chart(lines, title=name, x_label="seconds since the canary began", y_label=name)
        for name, lines in per_metric.items()
    ]


def _tenant_overview(state: Gateway, tenant: Tenant) -> dict[str, Any]:
    jobs, _ = state.jobs.page(tenant.id, limit=50)
    aliases = [_alias_view(state, tenant, alias) for alias in sorted(tenant.aliases) if alias != BASE_ALIAS]
    return {"tenant": tenant, "jobs": jobs, "aliases": [a for a in aliases if a is not None]}


def _alone(state: Gateway, tenant: Tenant, alias: str) -> bool:
    """Whether ``alias`` is granted to ``tenant`` and no other: only then are its canaries the tenant's to see
    (a shared alias's canary counts every tenant's traffic, and an operator's notes)."""
    return alias in tenant.aliases and state.tenants.holds_alone(tenant.id, alias)


def _alias_view(state: Gateway, tenant: Tenant, alias: str) -> dict[str, Any] | None:
    store = state.adapters.store
    versions = store.versions(alias)
    if not versions:
        return None
    stable, serving = store.stable(alias), store.serving(alias)
    canary = None
    if _alone(state, tenant, alias):
        canary = state.canaries.active.get(alias) or state.canaries.records.latest(alias)
    return {
        "alias": alias,
        "stable": stable.version if stable else None,
        "serving": serving.version if serving else None,
        "versions": [
            {
                "version": v.version,
                "retired": store.is_retired(v),
                "gate": (store.gate(v) or {}).get("passed"),
                "loaded": v.ref in state.adapters.loaded,
            }
            for v in versions
        ],
        "canary": canary.as_dict() if canary else None,
        "canary_active": canary is not None and canary.state in ACTIVE,
    }


def _operator_overview(state: Gateway) -> dict[str, Any]:
    tenants = state.tenants.all()
    names = {t.id: t.name for t in tenants}
    queue, _ = state.jobs.page(None, limit=100, statuses=("validating_files", "queued", "running", "paused"))
    recent, _ = state.jobs.page(None, limit=30)
    return {
        "tenants": tenants,
        "names": names,
        "engines": state.engine.describe(),
        "queue": queue,
        "recent": recent,
        "workers": state.jobs.workers(alive_s=30.0),
        "canaries": [c.as_dict() for c in state.canaries.active.values()],
    }
