"""``lorafleet tenants``: create tenants, grant them aliases, set their limits, issue and revoke their keys.

Writes go through a running gateway's admin API when one serves this data
directory (its key cache and limits change at once), else straight to the
state database. Reads come from the database.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Annotated, Any

import typer

from contract.settings import CommonSettings
from lorafleet.commands.adapters import AdminKeyOpt, admin_call, gateway_client
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="Tenants and API keys.")

RpmOpt = Annotated[int | None, typer.Option(help="Requests per minute (unset: unlimited).")]
ConcurrentOpt = Annotated[int | None, typer.Option(help="Requests in flight at once (unset: unlimited).")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Largest max_tokens per request (unset: unlimited).")]
TpmOpt = Annotated[int | None, typer.Option(help="Prompt + completion tokens per minute (unset: unlimited).")]
RunningJobsOpt = Annotated[int | None, typer.Option(help="Fine-tuning jobs training at once (unset: unlimited).")]
QueuedJobsOpt = Annotated[
    int | None, typer.Option(help="Fine-tuning jobs waiting: validating, queued, paused (unset: unlimited).")
]


def _store() -> Any:
    from serving.state.tenants import TenantStore

    settings = CommonSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return TenantStore(settings.state_url)


def _local(fn: Any, *args: Any) -> Any:
    from serving.state.tenants import TenantError

    try:
        return fn(*args)
    except TenantError as exc:
        raise fail(str(exc)) from exc


def _show(tenant: dict[str, Any]) -> None:
    limits = ", ".join(f"{k}={v}" for k, v in tenant["limits"].items() if v is not None) or "none"
    state = "disabled" if tenant["disabled"] else "enabled"
    aliases = ", ".join(tenant["aliases"]) or "-"
    console.print(
        f"{tenant['name']}: {state}; aliases {aliases}; default {tenant['default_alias'] or '-'}; limits {limits}",
        highlight=False,
    )


def _limits(*values: int | None) -> dict[str, int | None]:
    """The options in ``Limits``' order, by its field names."""
    from serving.state.tenants import Limits

    return dict(zip((f.name for f in fields(Limits)), values, strict=True))


@app.command("create")
def tenants_create(
    name: str,
    alias: Annotated[list[str] | None, typer.Option(help="Alias the tenant may use (repeatable).")] = None,
    rpm: RpmOpt = None,
    concurrent: ConcurrentOpt = None,
    max_tokens: MaxTokensOpt = None,
    tpm: TpmOpt = None,
    running_jobs: RunningJobsOpt = None,
    queued_jobs: QueuedJobsOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Create a tenant, grant it aliases, set its limits, and print its API key (shown once)."""
    from serving.state.tenants import DEFAULT_LIMITS

    client = gateway_client(CommonSettings(), admin_key)
    if client is not None:
        given = _limits(rpm, concurrent, max_tokens, tpm, running_jobs, queued_jobs)
        given = {k: v for k, v in given.items() if v is not None}  # the rest: the defaults
        created = admin_call(client.create_tenant, name, alias or [], given)
        console.print(created["api_key"], highlight=False)
        return
    store = _store()
    given = {
        k: v for k, v in _limits(rpm, concurrent, max_tokens, tpm, running_jobs, queued_jobs).items() if v is not None
    }
    limits = replace(DEFAULT_LIMITS, **given)
    _, key = _local(store.enroll, name, alias or [], limits)
    console.print(key, highlight=False)


@app.command("list")
def tenants_list() -> None:
    """Every tenant with its aliases, default alias and limits."""
    for tenant in _store().all():
        _show(tenant.as_dict())


@app.command("show")
def tenants_show(name: str) -> None:
    """One tenant and its keys (public ids only; keys are never stored)."""
    store = _store()
    tenant = _local(store.require, name)
    _show(tenant.as_dict())
    for k in store.keys(tenant):
        revoked = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live"
        console.print(f"  key {k.key_id}… created {k.created_at:%Y-%m-%d %H:%M}, {revoked}", highlight=False)


def _patch(name: str, admin_key: str | None, api: dict[str, Any], local: Any) -> None:
    """One tenant change: through the gateway (``api``: the PATCH body) or ``local(store)``."""
    client = gateway_client(CommonSettings(), admin_key)
    if client is not None:
        _show(admin_call(client.patch_tenant, name, **api))
    else:
        _show(_local(local, _store()).as_dict())


@app.command("disable")
def tenants_disable(name: str, admin_key: AdminKeyOpt = None) -> None:
    """Refuse every key of the tenant from now on (reversible with `enable`)."""
    _patch(name, admin_key, {"disabled": True}, lambda s: s.set_disabled(name, True))


@app.command("enable")
def tenants_enable(name: str, admin_key: AdminKeyOpt = None) -> None:
    """Accept the tenant's live keys again."""
    _patch(name, admin_key, {"disabled": False}, lambda s: s.set_disabled(name, False))


@app.command("default")
def tenants_default(
    name: str,
    alias: Annotated[str | None, typer.Argument(help="Alias used when a request names none.")] = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Set (or with no ALIAS, clear) the alias a request gets when its `model` is empty."""
    _patch(name, admin_key, {"default_alias": alias}, lambda s: s.set_default_alias(name, alias))


@app.command("limits")
def tenants_limits(
    name: str,
    rpm: RpmOpt = None,
    concurrent: ConcurrentOpt = None,
    max_tokens: MaxTokensOpt = None,
    tpm: TpmOpt = None,
    running_jobs: RunningJobsOpt = None,
    queued_jobs: QueuedJobsOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Replace the tenant's limits (an option left out means no limit)."""
    from serving.state.tenants import Limits

    values = (rpm, concurrent, max_tokens, tpm, running_jobs, queued_jobs)
    _patch(name, admin_key, {"limits": _limits(*values)}, lambda s: s.set_limits(name, Limits(*values)))


@app.command("grant")
def tenants_grant(name: str, alias: str, admin_key: AdminKeyOpt = None) -> None:
    """Let the tenant use ALIAS."""
    _grant(name, alias, admin_key, granted=True)


@app.command("revoke")
def tenants_revoke(name: str, alias: str, admin_key: AdminKeyOpt = None) -> None:
    """Take ALIAS away from the tenant."""
    _grant(name, alias, admin_key, granted=False)


def _grant(name: str, alias: str, admin_key: str | None, *, granted: bool) -> None:
    client = gateway_client(CommonSettings(), admin_key)
    if client is not None:
        _show(admin_call(client.grant if granted else client.revoke_grant, name, alias))
        return
    store = _store()
    tenant = _local(store.require, name)
    (store.grant if granted else store.revoke_grant)(tenant, alias)
    _show(store.require(name).as_dict())


def _new_key(name: str, admin_key: str | None, rotate: bool) -> None:
    client = gateway_client(CommonSettings(), admin_key)
    if client is not None:
        console.print(admin_call(client.issue_key, name, rotate=rotate), highlight=False)
        return
    store = _store()
    tenant = _local(store.require, name)
    console.print(store.rotate_key(tenant) if rotate else store.issue_key(tenant), highlight=False)


@app.command("issue-key")
def tenants_issue_key(name: str, admin_key: AdminKeyOpt = None) -> None:
    """A new key for the tenant, beside its others (printed once)."""
    _new_key(name, admin_key, rotate=False)


@app.command("rotate-key")
def tenants_rotate_key(name: str, admin_key: AdminKeyOpt = None) -> None:
    """A new key, and every other live key of the tenant revoked at the same moment (printed once)."""
    _new_key(name, admin_key, rotate=True)


@app.command("revoke-key")
def tenants_revoke_key(
    name: str,
    key_id: Annotated[str, typer.Argument(help="The key's public id (`show`).")],
    admin_key: AdminKeyOpt = None,
) -> None:
    """Revoke one key by its public id; requests with it get 401 from now on."""
    key_id = key_id.rstrip("…")
    client = gateway_client(CommonSettings(), admin_key)
    if client is not None:
        admin_call(client.revoke_key, name, key_id)
    else:
        store = _store()
        _local(store.revoke_key, _local(store.require, name), key_id)
    console.print(f"revoked {key_id}")
