"""deploy/: the Prometheus config, the alert rules and their unit tests, the Grafana dashboard and the compose file.

promtool comes with Debian's ``prometheus`` package (``make test`` installs it when missing).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.promql import (
    DEPLOY,
    as_promql,
    dashboard_queries,
    promtool,
)


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


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule), with Grafana's variables filled in."""
    queries = dashboard_queries()
    assert len(queries) >= 15
    recorded = [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
