"""``lorafleet engines``: the engines behind the running gateway, their health, load and adapters.

lorafleet engines            a table (name, health, running/waiting, KV cache, adapters held)
lorafleet engines --json     the admin API's answer, as is
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lorafleet.commands.adapters import AdminKeyOpt
from lorafleet.commands.canary import GatewayOpt, _call
from lorafleet.console import console


def engines(
    gateway: GatewayOpt = None,
    admin_key: AdminKeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the admin API's JSON.")] = False,
) -> None:
    """List the engines behind the running gateway: base model, health, load, and the adapters each holds."""
    from rich.table import Table

    listing = _call(gateway, admin_key, "GET", "/admin/engines")["data"]
    if as_json:
        console.print_json(json.dumps(listing))
        return
    table = Table("engine", "base model", "health", "running", "waiting", "in flight", "KV cache", "adapters (max)")
    for e in listing:
        health = (
            "up"
            if e["healthy"]
            else ("refused: " + e["refused"] if e["refused"] else "marked down" if e["marked_down"] else "down")
        )
        held = f"{', '.join(e['adapters']) or '-'} ({e['max_loras']})"
        base = f"{e['base']} (merged {e['merged']})" if e["merged"] else e["base"]
        table.add_row(
            e["name"],
            base,
            health,
            str(e["running"]),
            str(e["waiting"]),
            str(e["in_flight"]),
            f"{100 * e['kv_cache_usage']:.0f}%",
            held,
        )
    console.print(table)
