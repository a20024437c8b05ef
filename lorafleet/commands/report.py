"""``lorafleet report``: latency, TTFT, validity and traffic per alias from Prometheus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.console import console, fail


def report(
    prometheus: Annotated[str, typer.Option(envvar="LORAFLEET_PROMETHEUS_URL", help="Prometheus base URL.")] = (
        "http://127.0.0.1:9090"
    ),
    window: Annotated[str, typer.Option(help="How far back, e.g. 30m, 6h, 2d.")] = "1h",
    rate: Annotated[str, typer.Option(help="PromQL rate window, e.g. 5m (at least 4 scrape intervals).")] = "5m",
    out: Annotated[Path, typer.Option(help="Where to write the PNG.")] = Path("var/report.png"),
) -> None:
    """Latency percentiles, TTFT, JSON validity and traffic per alias from Prometheus, as a PNG and a table."""
    from rich.table import Table

    from lorafleet.ops_report import ReportError, render

    seconds = _duration(window, "--window")
    _duration(rate, "--rate")
    try:
        panels = render(prometheus, out, seconds, rate)
    except ReportError as exc:
        raise fail(str(exc)) from exc
    table = Table("panel", "series", "last", "max", title=f"last {window} (rate over {rate})", title_justify="left")
    for panel in panels:
        for s in panel.series:
            table.add_row(panel.title, s.label, f"{s.values[-1]:.3g} {panel.unit}", f"{max(s.values):.3g}")
        if not panel.series:
            table.add_row(panel.title, "no data", "-", "-")
    console.print(table)
    console.print(f"chart written to {out}")


def _duration(text: str, option: str) -> float:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise fail(f"{option} {text!r}: give a number and a unit, e.g. 90s, 30m, 6h, 2d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
