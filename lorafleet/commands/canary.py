"""``lorafleet canary``: start, watch and steer canary rollouts on a running gateway (its admin API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from contract.settings import CommonSettings
from lorafleet.admin_client import AdminClient, admin_key_of, running_gateway
from lorafleet.commands.adapters import AdminKeyOpt, ReasonOpt, admin_call
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="Canary rollouts on a running gateway (its admin API).")

GatewayOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LORAFLEET_GATEWAY_URL",
        help="The running gateway (default: the one serving this data directory, else :8000).",
    ),
]


def _call(gateway: str | None, admin_key: str | None, method: str, path: str, body: dict | None = None) -> Any:
    settings = CommonSettings()
    key = admin_key_of(settings, admin_key)
    url = (gateway or running_gateway(settings) or "http://127.0.0.1:8000").rstrip("/")
    return admin_call(AdminClient(url, key, timeout=60).call, method, path, body)


def _show_canary(status: dict[str, Any]) -> None:
    from rich.table import Table

    steps = " -> ".join(f"{w}%" for w in status["steps"])
    console.print(
        f"[bold]{status['alias']}[/]: candidate v{status['candidate']} vs stable v{status['stable']}, "
        f"{status['state']}, step {status['step']}/{len(status['steps'])} ({steps}), "
        f"candidate weight {status['weight']:.0%}{' (forced)' if status['forced'] else ''}"
    )
    windows = status.get("window") or {}
    if status["state"] in ("running", "paused"):
        for variant in ("stable", "canary"):
            w = windows.get(variant, {})
            cut = f" ({w['cut_by_client']} cut by the client's max_tokens)" if w.get("cut_by_client") else ""
            console.print(
                f"  {variant:<7} {w.get('requests', 0)} requests, {w.get('errors', 0)} errors, "
                f"{w.get('valid', 0)}/{w.get('json_checked', 0)} JSON valid{cut}, "
                f"{w.get('streams', 0)} streams "
                f"(window {status.get('window_age_s')} s of {status['config']['interval_s']:g} s)",
                highlight=False,
            )
    analysis = status.get("last_analysis")
    if not analysis:
        console.print("  no analysis yet in this step")
        return
    console.print(f"  latest analysis: {analysis['decision']}: {analysis['reason']}", highlight=False)
    if analysis["metrics"]:
        table = Table("metric", "stable", "canary", "n (s/c)", "threshold", "p-value", "verdict")
        for m in analysis["metrics"]:
            fmt = (lambda v: f"{v:.3f}") if "stable" in m else (lambda v: "-")
            table.add_row(
                m["metric"],
                fmt(m.get("stable")),
                fmt(m.get("canary")),
                f"{m['n_stable']}/{m['n_canary']}",
                m.get("threshold", "-"),
                f"{m['p_value']:.2g}" if "p_value" in m else "-",
                "REGRESSION" if m["regression"] else m.get("note", "ok"),
            )
        console.print(table)


@app.command("start")
def canary_start(
    alias: str,
    version: Annotated[int, typer.Option(help="The candidate version (it must have passed its gate).")],
    steps: Annotated[str, typer.Option(help="Candidate weights in %, rising; 100 promotes.")] = "5,25,50,100",
    interval: Annotated[float, typer.Option(help="Analysis interval per step, seconds.")] = 60.0,
    min_samples: Annotated[int, typer.Option(help="Requests per variant before judging.")] = 50,
    max_validity_drop: Annotated[float, typer.Option(help="Tolerated drop in JSON validity (0-1).")] = 0.02,
    max_error_increase: Annotated[float, typer.Option(help="Tolerated rise in the error rate (0-1).")] = 0.01,
    max_latency_ratio: Annotated[float, typer.Option(help="Tolerated candidate/stable latency.")] = 1.5,
    confidence: Annotated[float, typer.Option(help="Confidence of each test.")] = 0.95,
    force: Annotated[bool, typer.Option(help="Start without a passing evaluation gate (recorded).")] = False,
    reason: ReasonOpt = "",
    gateway: GatewayOpt = None,
    admin_key: AdminKeyOpt = None,
) -> None:
    """Start sending a share of ALIAS's traffic to VERSION; the gateway steps it up, promotes or rolls back."""
    try:
        weights = [int(w) for w in steps.split(",")]
    except ValueError as exc:
        raise fail(f"--steps {steps!r}: give rising percentages, e.g. 5,25,50,100") from exc
    body = {
        "version": version,
        "steps": weights,
        "interval_s": interval,
        "min_samples": min_samples,
        "max_validity_drop": max_validity_drop,
        "max_error_increase": max_error_increase,
        "max_latency_ratio": max_latency_ratio,
        "confidence": confidence,
        "force": force,
        "reason": reason,
    }
    _show_canary(_call(gateway, admin_key, "POST", f"/admin/canaries/{alias}", body))


@app.command("status")
def canary_status(alias: str, gateway: GatewayOpt = None, admin_key: AdminKeyOpt = None) -> None:
    """Step, weight, samples per variant and the latest comparison per metric."""
    _show_canary(_call(gateway, admin_key, "GET", f"/admin/canaries/{alias}"))


@app.command("events")
def canary_events(alias: str, gateway: GatewayOpt = None, admin_key: AdminKeyOpt = None) -> None:
    """Every decision of ALIAS's canaries, with its reason (numbers: the admin API's events route)."""
    for e in _call(gateway, admin_key, "GET", f"/admin/canaries/{alias}/events")["data"]:
        console.print(
            f"{e['time'][:19]} canary {e['canary']} {e['action']:<20} by {e['actor']}: {e['reason']}", highlight=False
        )


def _canary_action(action: str) -> Any:
    def command(
        alias: str,
        reason: ReasonOpt = "",
        gateway: GatewayOpt = None,
        admin_key: AdminKeyOpt = None,
    ) -> None:
        _show_canary(_call(gateway, admin_key, "POST", f"/admin/canaries/{alias}/{action}", {"reason": reason}))

    return command


for _action, _help in (
    ("pause", "Hold the weight; no decisions until resumed."),
    ("resume", "Resume a paused canary (its step's window starts again)."),
    ("promote", "Promote the candidate now (the stable pointer moves)."),
    ("rollback", "Roll back now: the candidate is retired, stable serves everyone."),
    ("abort", "Stop the canary; the candidate stays published but gets no traffic."),
):
    app.command(_action, help=_help)(_canary_action(_action))
