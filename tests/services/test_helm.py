"""The Helm chart's PrometheusRule is deploy/alerts.yml and passes promtool (the chart's other checks, which
need no server: tests/unit/test_helm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.promql import DASHBOARD, DEPLOY, promtool
from tests.unit.test_helm import DATABASE, objects, one, render


def test_the_prometheus_rule_is_the_alert_rules_and_passes_promtool(tmp_path: Path) -> None:
    docs = render(DATABASE)
    rule = one(docs, "PrometheusRule", "lf-lorafleet")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    result = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The gateway's ServiceMonitor gives job="lorafleet", which the rules select on.
    [monitor] = [d for d in objects(docs, "ServiceMonitor") if d["metadata"]["name"].endswith("-gateway")]
    gateway_service = one(docs, "Service", "lf-lorafleet-gateway")
    assert gateway_service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "lorafleet"
    assert 'job="lorafleet"' in (DEPLOY / "alerts.yml").read_text()
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["key"] == "metrics-key"
    dashboard = one(docs, "ConfigMap", "lf-lorafleet-dashboard")
    assert json.loads(dashboard["data"]["lorafleet.json"]) == json.loads(DASHBOARD.read_text())
