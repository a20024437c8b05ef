"""``lorafleet report``: the key series over a window, from Prometheus's HTTP API, as one PNG and a table.

For ops who would rather look than read, without Grafana: end-to-end latency
p50/p95/p99 and time to first token p95 per alias, JSON validity % per alias
and variant, and requests/s by status class. The same queries as the Grafana
dashboard (deploy/grafana/dashboards/lorafleet.json).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx


class ReportError(RuntimeError):
    """Prometheus could not be asked, or refused a query; the message says which and why."""


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass
class Panel:
    title: str
    unit: str
    queries: list[tuple[str, str]]  # (PromQL, legend with {label} fields)
    series: list[Series] = field(default_factory=list)


def panels(rate: str) -> list[Panel]:
    lat = f"sum by (alias, le) (rate(lorafleet_request_duration_seconds_bucket[{rate}]))"
    ttft = f"sum by (alias, le) (rate(lorafleet_time_to_first_token_seconds_bucket[{rate}]))"
    valid = (
        f'100 * sum by (alias, variant) (rate(lorafleet_json_checks_total{{outcome="valid"}}[{rate}])) '
        f"/ sum by (alias, variant) (rate(lorafleet_json_checks_total[{rate}]))"
    )
    requests = f"sum by (alias, status_class) (rate(lorafleet_requests_total[{rate}]))"
    latency = [(f"histogram_quantile({q}, {lat})", f"{{alias}} p{round(q * 100)}") for q in (0.5, 0.95, 0.99)]
    return [
        Panel("End-to-end latency", "s", latency),
        Panel("Time to first token (streams)", "s", [(f"histogram_quantile(0.95, {ttft})", "{alias} p95")]),
        Panel("JSON valid", "%", [(valid, "{alias} {variant}")]),
        Panel("Requests", "req/s", [(requests, "{alias} {status_class}")]),
    ]


def fetch(prometheus: str, panel: Panel, start: float, end: float, step: float) -> None:
    for query, legend in panel.queries:
        try:
            resp = httpx.get(
                f"{prometheus.rstrip('/')}/api/v1/query_range",
                params={"query": query, "start": start, "end": end, "step": step},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            raise ReportError(f"cannot reach Prometheus at {prometheus}: {exc}") from exc
        data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code != 200 or data.get("status") != "success":
            raise ReportError(f"Prometheus refused {query!r}: {data.get('error', resp.text[:200])}")
        for result in data["data"]["result"]:
            points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if points:
                label = legend.format_map(_Missing(result["metric"]))
                panel.series.append(Series(label, [t for t, _ in points], [v for _, v in points]))


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "-"


def render(prometheus: str, out: Path, window_s: float, rate: str, step_s: float | None = None) -> list[Panel]:
    """Query every panel over the last ``window_s`` seconds and write the PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - window_s
    step = step_s or max(1.0, window_s / 240)
    result = panels(rate)
    for panel in result:
        fetch(prometheus, panel, start, end, step)
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), constrained_layout=True)
    for ax, panel in zip(axes.flat, result, strict=True):
        for s in panel.series:
            ax.plot([datetime.fromtimestamp(t, UTC) for t in s.times], s.values, label=s.label)
        ax.set_title(panel.title)
        ax.set_ylabel(panel.unit)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this window", ha="center", va="center", transform=ax.transAxes)
    stamp = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(f"lorafleet, last {window_s / 60:.0f} min to {stamp} ({prometheus}, rate over {rate})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return result
