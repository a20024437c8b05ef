"""``lorafleet adapters``: publish, list, promote, retire adapter versions and set an alias's JSON policy.

Reads come from the store directly. Writes that change what a gateway serves
(publish, promote, retire, policy) go through the gateway's admin API when one
is running over the same data directory (``lorafleet.admin_client``), so it
loads, unloads and re-reads at once; with no gateway running they write the
store and the state database directly, after the same checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from contract.settings import CommonSettings
from lorafleet.admin_client import AdminClient, AdminError, admin_key_of, running_gateway
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="The adapter store.")

AdminKeyOpt = Annotated[
    str | None, typer.Option(envvar="LORAFLEET_ADMIN_KEY", help="Admin key (default: data_dir/admin.key).")
]
ReasonOpt = Annotated[str, typer.Option(help="Why, for the audit trail.")]


def gateway_client(settings: CommonSettings, admin_key: str | None = None) -> AdminClient | None:
    """A client for the gateway serving this data directory, or ``None`` when none is running."""
    url = running_gateway(settings)
    return None if url is None else AdminClient(url, admin_key_of(settings, admin_key))


def admin_call(fn: Any, *args: Any, **kw: Any) -> Any:
    """Call an ``AdminClient`` method; an error becomes a clean CLI error with the gateway's message."""
    try:
        return fn(*args, **kw)
    except AdminError as exc:
        raise fail(str(exc)) from exc


def _ref(ref: str) -> tuple[str, int]:
    alias, _, version = ref.partition("@")
    if not version.isdigit():
        raise fail(f"{ref!r}: name the version, e.g. {alias}@2 (see `lorafleet adapters list`)")
    return alias, int(version)


@app.command("publish")
def adapters_publish(source: Path, alias: str, admin_key: AdminKeyOpt = None) -> None:
    """Publish an adapter directory as the next version of ALIAS."""
    publish_adapter(CommonSettings(), source, alias, admin_key)


def publish_adapter(settings: CommonSettings, source: Path, alias: str, admin_key: str | None = None) -> None:
    """Publish after the same checks the gateway runs (``contract.fit``) against the adapter's base model: the
    configured one, or the one it was trained on when that is provisioned too (a second engine's base)."""
    from contract.fit import problems_on_its_base
    from contract.manifest import ManifestError
    from contract.store import StoreError
    from serving.state.ledger import open_store

    client = gateway_client(settings, admin_key)
    if client is not None:  # the gateway checks, publishes and loads it
        result = admin_call(client.publish, source, alias)
        loaded = "loaded on the engine" if result.get("loaded") else "not loaded yet"
        console.print(
            f"published {result['ref']} through the gateway at {client.url} ({loaded}; "
            f"{alias} serves version {result['serving']})",
            highlight=False,
        )
        return
    try:
        problems = problems_on_its_base(source, settings.models_dir, settings.base_model_path(), settings.max_lora_rank)
    except ManifestError as exc:
        raise fail(str(exc)) from exc
    if problems:
        raise fail(f"{source}: cannot be served, not published:\n  " + "\n  ".join(problems))
    try:
        version = open_store(settings).publish(source, alias)
    except (ManifestError, StoreError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"published {version.ref} at {version.path}")


@app.command("list")
def adapters_list() -> None:
    """Every alias: its versions, which one serves, and each version's gate verdict."""
    from rich.table import Table

    from serving.state.ledger import open_store

    store = open_store(CommonSettings())
    table = Table("alias", "version", "serving", "gate", "trained", title_justify="left")
    for alias in store.aliases():
        serving = store.serving(alias)
        for v in store.versions(alias):
            gate = store.gate(v)
            verdict = "-" if gate is None else ("passed" if gate["passed"] else "failed")
            marker = ("stable" if store.stable(alias) == v else "newest") if serving == v else ""
            marker = "retired" if store.is_retired(v) else marker
            table.add_row(alias, str(v.version), marker, verdict, f"{v.manifest().created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="ALIAS@VERSION")]) -> None:
    """One version: how it was trained, its gate verdict, and whether it serves."""
    from contract.manifest import ManifestError
    from contract.store import StoreError
    from serving.state.ledger import open_store

    alias, _, version = ref.partition("@")
    if not version.isdigit():
        raise fail(f"{ref!r}: name the version, e.g. {alias}@2 (see `lorafleet adapters list`)")
    store = open_store(CommonSettings())
    try:
        target = store.get(alias, int(version))
        m = target.manifest()
    except (StoreError, ManifestError) as exc:
        raise fail(str(exc)) from exc
    role = "stable" if store.stable(alias) == target else ("serving" if store.serving(alias) == target else "-")
    gate = store.gate(target)
    verdict = "-" if gate is None else ("passed" if gate.get("passed") else "failed")
    console.print(
        f"{target.ref} at {target.path}\n  task {m.task}; trained {m.created_at:%Y-%m-%d %H:%M} on "
        f"{m.base_model.name} ({m.base_model.sha256[:12]}); data {m.data.path} ({m.data.examples} examples)\n"
        f"  LoRA r={m.lora.rank} alpha={m.lora.alpha:g} on {', '.join(m.lora.target_modules)}; "
        f"tools format {m.prompt_format.tools_format or '-'}; output schema "
        f"{'yes' if m.output_schema else 'no'}\n  role {role}; retired {store.is_retired(target)}; "
        f"gate {verdict}",
        highlight=False,
    )


@app.command("history")
def adapters_history(alias: str) -> None:
    """Every promotion and rollback of ALIAS, forced or not."""
    from contract.store import StoreError
    from serving.state.ledger import open_store

    try:
        events = open_store(CommonSettings()).events(alias)
    except StoreError as exc:
        raise fail(str(exc)) from exc
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        forced = " FORCED" if e["forced"] else ""
        console.print(
            f"{when} {e['action']} {e['from']} -> {e['to']}{forced} gate={e['gate_passed']} "
            f"by {e['actor']}: {e['reason'] or '-'}",
            highlight=False,
        )


@app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="ALIAS@VERSION to make stable (an earlier one rolls back).")],
    force: Annotated[bool, typer.Option(help="Promote without a passing evaluation gate (recorded).")] = False,
    reason: ReasonOpt = "",
    admin_key: AdminKeyOpt = None,
) -> None:
    """Make a version stable: it must have passed `lorafleet eval --gate` unless --force."""
    from contract.store import StoreError
    from serving.state.ledger import open_store

    alias, version = _ref(ref)
    settings = CommonSettings()
    client = gateway_client(settings, admin_key)
    if client is not None:
        event = admin_call(client.promote, alias, version, force=force, reason=reason)
    else:
        try:
            event = open_store(settings).promote(alias, version, force=force, reason=reason)
        except StoreError as exc:
            raise fail(str(exc)) from exc
    forced = " (forced, without a passing gate)" if event["forced"] and not event["gate_passed"] else ""
    console.print(f"{event['action']}: {alias} now serves version {event['to']} (was {event['from']}){forced}")


@app.command("retire")
def adapters_retire(
    ref: Annotated[str, typer.Argument(help="ALIAS@VERSION to take out of service.")],
    reason: ReasonOpt = "",
    admin_key: AdminKeyOpt = None,
) -> None:
    """Take a version out of service: no request goes to it from now on (files are kept). A running gateway
    unloads it from the engine once its in-flight requests finish."""
    from contract.store import StoreError
    from serving.state.ledger import open_store

    alias, version = _ref(ref)
    settings = CommonSettings()
    client = gateway_client(settings, admin_key)
    if client is not None:
        event = admin_call(client.retire, alias, version, reason=reason)
        console.print(f"retired {ref} ({event['draining_requests']} requests still running on it)")
        return
    try:
        open_store(settings).retire(alias, version, reason=reason)
    except StoreError as exc:
        raise fail(str(exc)) from exc
    console.print(f"retired {ref}")


@app.command("policy")
def adapters_policy(
    alias: str,
    json_mode: Annotated[
        str | None, typer.Option(help="enforce (constrained decoding), validate (check after) or off.")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file: the alias's schema for requests without response_format.")
    ] = None,
    reset: Annotated[bool, typer.Option(help="Back to the defaults (the adapter manifest's schema).")] = False,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Show or set ALIAS's JSON mode and default schema (the gateway reads them on every request)."""
    from serving.errors import APIError
    from serving.outputs.modes import JSON_MODES, AliasPolicy
    from serving.outputs.schemas import check_client_schema
    from serving.state.ledger import open_store
    from serving.state.policies import AliasPolicies
    from serving.state.tenants import TenantStore

    settings = CommonSettings()
    if alias not in open_store(settings).aliases():
        raise fail(f"no alias {alias!r} in the adapter store: publish a version first (`lorafleet adapters list`)")
    if json_mode is not None and json_mode not in JSON_MODES:
        raise fail(f"--json-mode {json_mode!r}: use one of {', '.join(JSON_MODES)}")
    document = None
    if schema is not None:
        try:
            document = json.loads(schema.read_text("utf-8"))
            check_client_schema(document, param=str(schema))
        except (OSError, json.JSONDecodeError, APIError) as exc:
            raise fail(f"{schema}: {exc}") from exc
    changed = reset or json_mode is not None or schema is not None
    client = gateway_client(settings, admin_key)
    if client is not None:
        current = {"json_mode": None, "default_schema": None} if reset else admin_call(client.policy, alias)
        mode = json_mode if json_mode is not None else current["json_mode"]
        default = document if document is not None else current["default_schema"]
        if changed:
            admin_call(client.set_policy, alias, mode, default)
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        policies = AliasPolicies(TenantStore(settings.state_url).engine)
        policy = AliasPolicy() if reset else policies.get(alias)
        policy = AliasPolicy(json_mode or policy.json_mode, document if document is not None else policy.default_schema)  # type: ignore[arg-type]
        if changed:
            policies.set(alias, policy)
        mode, default = policy.json_mode, policy.default_schema
    source = "set by admin" if default is not None else "the adapter manifest's"
    shown = mode or "default (enforce a request's schema, validate the alias's)"
    console.print(f"{alias}: json_mode {shown}; schema {source}", highlight=False)
