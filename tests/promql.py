"""What the deploy tests share: where deploy/ is, promtool, and the dashboard's PromQL taken apart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.metrics import GatewayMetrics, JobsCollector, StateCollector
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lorafleet.json"
# Grafana's variables, as Prometheus would see them on a dashboard with every alias selected.
GRAFANA_VARS = {"$__rate_interval": "5m", "$alias": ".*"}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "and",
    "or",
    "le",
    "without",
    "on",
    "ignoring",
    "avg",
    "min",
    "count",
    "label_values",
    "inf",
    "nan",
}


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    if "tests/unit/" in os.environ.get("PYTEST_CURRENT_TEST", ""):
        pytest.fail("promtool is a service: a test that runs it belongs in tests/services/")
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `apt-get install prometheus` (make test does it)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            queries.append((f"variable {var['name']}", var["definition"]))
    return queries


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    match = re.fullmatch(r"label_values\((\w+), *\w+\)", expr)
    return match.group(1) if match else expr  # a variable query: its metric is what must exist


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (words that are not PromQL functions, keywords or label names)."""
    without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r"by \([^)]*\)", "", expr))
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    words = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges)
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", w)}


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway can export, from its metric families (children or not)."""
    metrics = GatewayMetrics(tenant_label=True)
    metrics.add_state(StateCollector(lambda: True, lambda: 0, lambda: 0, dict))
    metrics.add_state(JobsCollector())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in metrics.registry.collect() for suffix in suffixes[family.type]}


def recorded_names() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
