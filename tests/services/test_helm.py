"""deploy/helm/lorafleet, checked without a cluster.

The chart is rendered by Helm's own engine (``helm-python-sdk`` bundles it as a library) with the default
values (CPU engines), the GPU values and a values set turning every option on; every rendered object is
validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``) of the oldest Kubernetes the chart
supports and the newest known, the custom resources (ServiceMonitor, PrometheusRule, ScaledObject) against
their CRDs' own schemas (tests/data/crds). Then what ties the chart to the code: every gateway variable is a
``GatewaySettings`` field, every probe path is a route, the engines file is one the gateway loads, the GPU
engine gets the flags the gateway gives its own engine, the PrometheusRule is deploy/alerts.yml and passes
promtool. What cannot run here (no cluster): docs/kubernetes.md says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from tests.conftest import ROOT
from tests.promql import DASHBOARD, DEPLOY, promtool

CHART = DEPLOY / "helm" / "lorafleet"
CRDS = ROOT / "tests" / "data" / "crds"
NAMESPACE = "ml"
DATABASE = {"database": {"url": "postgresql+psycopg://lorafleet:secret@postgres:5432/lorafleet"}}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBERNETES = ("1.29.0", kubernetes_validate.utils.latest_version() + ".0")
# Settings the chart sets itself, and those only a gateway supervising its own engine reads.
CHART_SETS = {
    "host",
    "port",
    "data_dir",
    "base_model",
    "engines_file",
    "max_lora_rank",
    "max_model_len",
    "admin_key",
    "metrics_key",
    "database_url",
    "redis_url",
}
CHILD_ONLY = {
    "engine_url",
    "engine_key",
    "engine_port",
    "engine_nice",
    "engine_start_timeout_s",
    "kv_cache_gib",
    "max_loras",
    "dev_mode",
}


def everything_on() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["gateway"]["autoscaling"]["enabled"] = True
    values["redis"]["url"] = "redis://redis-master:6379/0"
    engine = values["engines"][0]
    engine |= {"extraArgs": ["--enforce-eager"], "env": {"VLLM_CPU_KVCACHE_SPACE": 4}}
    engine["autoscaling"]["enabled"] = True
    engine["podDisruptionBudget"]["enabled"] = True
    gpu = yaml.safe_load((CHART / "values-gpu.yaml").read_text())["engines"][0] | {"name": "gpu-pool"}
    values["engines"].append(gpu)
    return values | DATABASE


SCENARIOS: dict[str, dict[str, Any]] = {
    "cpu": DATABASE,
    "gpu": yaml.safe_load((CHART / "values-gpu.yaml").read_text()) | DATABASE,
    "everything": everything_on(),
    "existing-secret": {"secrets": {"existingSecret": "lorafleet-keys"}},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(values, name="lf", namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(docs: list[dict[str, Any]], component: str) -> Iterator[dict[str, Any]]:
    for d in objects(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            yield from d["spec"]["template"]["spec"]["containers"]


CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


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
