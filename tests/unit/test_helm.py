"""deploy/helm/lorafleet, checked without a cluster.

The chart is rendered by Helm's own engine (``helm-python-sdk`` bundles it as a library) with the default
values (CPU engines), the GPU values and a values set turning every option on; every rendered object is
validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``) of the oldest Kubernetes the chart
supports and the newest known, the custom resources (ServiceMonitor, PrometheusRule, ScaledObject) against
their CRDs' own schemas (tests/data/crds). Then what ties the chart to the code: every gateway variable is a
``GatewaySettings`` field, every probe path is a route, the engines file is one the gateway loads, the GPU
engine gets the flags the gateway gives its own engine, the PrometheusRule is deploy/alerts.yml (that it passes
promtool: tests/services/test_helm.py). What cannot run here (no cluster): docs/kubernetes.md says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from serving.config import GatewaySettings
from serving.engines.specs import EngineSpec, load_engines_file
from serving.engines.vllm import vllm_command
from tests.conftest import ROOT
from tests.promql import DEPLOY

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
    "files_dir",
    "jobs_dir",
    "base_model",
    "engines_file",
    "max_lora_rank",
    "max_model_len",
    "json_backend",
    "json_whitespace",
    "lora_ops",
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
    values["worker"] |= {"executor": "ray", "gpus": 1, "settings": {"job_lease_s": 90}}
    values["worker"]["autoscaling"]["enabled"] = True
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


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(SCENARIOS[request.param])


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(docs: list[dict[str, Any]], component: str) -> Iterator[dict[str, Any]]:
    for d in objects(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            yield from d["spec"]["template"]["spec"]["containers"]


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    version = api_version.rsplit("/", 1)[-1]
    return json.loads((CRDS / f"{kind.lower()}-{version}.json").read_text())["openAPIV3Schema"]


CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


def test_the_chart_lints_clean() -> None:
    for values in SCENARIOS.values():
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_every_object_is_valid_for_kubernetes(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = scenario
    assert docs, name
    for doc in docs:
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in CUSTOM:
            jsonschema.Draft7Validator(crd_schema(doc["kind"], doc["apiVersion"])).validate(doc)
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} on Kubernetes {version}: {exc.message} at {list(exc.absolute_path)}")


def test_the_schemas_catch_a_broken_object() -> None:
    # The validators above are not vacuous: a typo in a field or a wrong type is found.
    [deployment] = [d for d in render(DATABASE) if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"]]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES[0], strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES[0], strict=True)
    [monitor] = [d for d in render(DATABASE) if d["kind"] == "ServiceMonitor"][:1]
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_schema("ServiceMonitor", monitor["apiVersion"])).validate(monitor)


def test_the_chart_has_every_part_a_fleet_needs(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = scenario
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "Job",
    } <= kinds
    assert ("Secret" in kinds) == (name != "existing-secret")
    claims = objects(docs, "PersistentVolumeClaim")
    assert {c["metadata"]["name"] for c in claims} == {"lf-lorafleet-models", "lf-lorafleet-adapters"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)
    if name in ("gpu", "everything"):
        assert "HorizontalPodAutoscaler" in kinds and "ScaledObject" in kinds
        assert "replicas" not in one(docs, "Deployment", "lf-lorafleet-gateway")["spec"]  # the HPA owns it


def test_gateway_variables_are_settings_and_the_schema_lists_the_rest() -> None:
    fields = set(GatewaySettings.model_fields)
    for name, values in SCENARIOS.items():
        docs = render(values)
        engines_file = yaml.safe_load(one(docs, "ConfigMap", "lf-lorafleet-engines")["data"]["engines.yaml"])
        key_envs = {e["key_env"] for e in engines_file["engines"]}
        for container in containers(docs, "gateway"):
            for var in container["env"]:
                if var["name"].startswith("LORAFLEET_"):
                    assert var["name"].removeprefix("LORAFLEET_").lower() in fields, f"{name}: {var['name']}"
                elif var["name"] in ("HOME", "USER", "LOGNAME"):
                    assert var["value"] in ("/tmp", "lorafleet")  # caches in the container's own emptyDir
                else:
                    assert var["name"] in key_envs, f"{name}: {var['name']} is neither a setting nor an engine key"
    # values.schema.json accepts exactly the settings a user may set through gateway.settings.
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["gateway"]["properties"]["settings"]["propertyNames"]["enum"])
    assert allowed == fields - CHART_SETS - CHILD_ONLY
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["settings"]) <= allowed


def test_probes_name_real_routes(tmp_path: Path) -> None:
    from serving.app import build_app

    app = build_app(GatewaySettings(dev_mode=True, data_dir=tmp_path))
    gateway_routes = {getattr(r, "path", None) for r in app.routes}
    engine_routes = vllm_routes()
    for name, values in SCENARIOS.items():
        docs = render(values)
        for component, routes in (("gateway", gateway_routes), ("engine", engine_routes)):
            for container in containers(docs, component):
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    path = container[probe]["httpGet"]["path"]
                    assert path in routes, f"{name}: {component} {probe} {path}"
                    assert container[probe]["httpGet"]["port"] in [p["name"] for p in container["ports"]]


def vllm_routes() -> set[str]:
    """The GET routes vLLM's OpenAI server declares (read from its source: importing vLLM takes a while)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations))) / "entrypoints"
    declared = re.compile(r"""\.(?:get|api_route)\(\s*["'](/[^"']*)["']""")
    return {m for path in root.rglob("*.py") for m in declared.findall(path.read_text(errors="replace"))}


def test_the_engines_file_is_one_the_gateway_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_API_KEY", "k" * 32)
    docs = render(SCENARIOS["everything"])
    path = tmp_path / "engines.yaml"
    path.write_text(one(docs, "ConfigMap", "lf-lorafleet-engines")["data"]["engines.yaml"])
    specs = load_engines_file(path)
    values = SCENARIOS["everything"]["engines"]
    assert [s.name for s in specs] == [e["name"] for e in values]
    services = {s["metadata"]["name"] for s in objects(docs, "Service") if s["spec"].get("clusterIP") == "None"}
    for spec, engine in zip(specs, values, strict=True):
        assert spec.discover == "dns" and spec.base == engine["baseModel"] and spec.max_loras == engine["maxLoras"]
        host = spec.url.split("//")[1].split(":")[0] if spec.url else ""
        assert host.removesuffix(f".{NAMESPACE}.svc") in services


def test_engines_get_the_flags_the_gateway_gives_its_own() -> None:
    docs = render(SCENARIOS["everything"])
    cpu, gpu = (one(docs, "Deployment", f"lf-lorafleet-engine-{n}") for n in ("smollm2", "gpu-pool"))
    [cpu_vllm] = cpu["spec"]["template"]["spec"]["containers"]
    [gpu_vllm] = gpu["spec"]["template"]["spec"]["containers"]
    # CPU: this project's image runs `lorafleet serve-engine`, which builds them (tests/unit/test_helm.py below).
    assert cpu_vllm["command"][:2] == ["lorafleet", "serve-engine"]
    assert cpu_vllm["command"][cpu_vllm["command"].index("--") + 1 :] == ["--enforce-eager"]
    assert "nvidia.com/gpu" not in cpu_vllm["resources"].get("limits", {})
    # GPU: the upstream image, given them in the template: the same as vllm_command's, to the last flag.
    settings = GatewaySettings(dev_mode=True, data_dir=Path("/app/var"), max_lora_rank=16, max_model_len=2048)
    spec = EngineSpec(name="gpu-pool", port=8000, max_loras=8, extra_args=["--gpu-memory-utilization", "0.90"])
    assert gpu_vllm["command"] + gpu_vllm["args"] == ["python3", *vllm_command(settings, spec, host="0.0.0.0")[1:]]
    assert gpu_vllm["image"].startswith("vllm/vllm-openai:")
    assert gpu_vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {v["name"]: v for v in gpu_vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "engine-key"


def test_serve_engine_runs_vllm_with_the_gateways_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.cli import app

    model = tmp_path / "models" / "SmolLM2-135M-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["serve-engine"])
    assert refused.exit_code == 2 and "VLLM_API_KEY is not set" in refused.output
    ran: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr("os.execvpe", lambda file, argv, env: ran.append((argv, env)))
    monkeypatch.setenv("VLLM_API_KEY", "engine-key-0123456789")
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "admin-key-not-for-engines")
    result = runner.invoke(app, ["serve-engine", "--max-loras", "3", "--", "--enforce-eager"])
    assert result.exit_code == 0, result.output
    [(argv, env)] = ran
    settings = GatewaySettings(dev_mode=True, data_dir=tmp_path)
    spec = EngineSpec(name="engine", port=8000, max_loras=3, extra_args=["--enforce-eager"])
    assert argv == vllm_command(settings, spec, host="0.0.0.0")
    assert env["VLLM_API_KEY"] == "engine-key-0123456789" and "LORAFLEET_ADMIN_KEY" not in env
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path / "empty"))  # the base model is not there
    missing = runner.invoke(app, ["serve-engine"])
    assert missing.exit_code == 2 and "not provisioned" in missing.output and len(ran) == 1


@pytest.mark.parametrize("scenario", list(SCENARIOS.items()), ids=list(SCENARIOS))
def test_every_container_runs_unprivileged_on_a_read_only_root(scenario: tuple[str, dict[str, Any]]) -> None:
    """GPU engines too: no root, no privilege escalation, no capabilities, a read-only root filesystem, and the
    places a container writes (data_dir, /tmp) its own emptyDirs."""
    docs = render(scenario[1])
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            for mount in container.get("volumeMounts", []):
                if not mount.get("readOnly"):  # a writable place is a volume of its own, never the image
                    assert mount["name"] in volumes


def test_a_stopping_gateway_lets_its_streams_finish() -> None:
    """Out of the Service first (preStop), then as long as the engine's timeout for the streams in flight."""
    docs = render(DATABASE)
    [deployment] = [d for d in objects(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    [gateway] = pod["containers"]
    grace = {e["name"]: e.get("value") for e in gateway["env"]}["LORAFLEET_SHUTDOWN_GRACE_S"]
    assert int(grace) >= GatewaySettings.model_fields["upstream_timeout_s"].default
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(grace) + int(
        gateway["lifecycle"]["preStop"]["exec"]["command"][1]
    )


def test_engines_take_traffic_only_from_gateways() -> None:
    docs = render(DATABASE)
    [policy] = objects(docs, "NetworkPolicy")
    engine_pods = one(docs, "Deployment", "lf-lorafleet-engine-smollm2")["spec"]["template"]["metadata"]["labels"]
    gateway_pods = one(docs, "Deployment", "lf-lorafleet-gateway")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= engine_pods.items()
    [rule] = policy["spec"]["ingress"]
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
    assert len(peers) == 1 and peers[0].items() <= gateway_pods.items()
    assert not peers[0].items() <= engine_pods.items()


@pytest.mark.parametrize(
    ("values", "error", "says"),
    [
        ({}, helm.HelmError, "database.url is empty"),
        ({"database": {"url": "sqlite:///var/state.db"}}, helm.HelmError, "not a PostgreSQL URL"),
        (DATABASE | {"redis": {"url": "localhost:6379"}}, helm.HelmError, "redis"),
        (DATABASE | {"gateway": {"settings": {"state_cache": 5}}}, helm.HelmError, "state_cache"),
        (
            DATABASE
            | {
                "engines": [
                    {
                        "name": "a",
                        "baseModel": "SmolLM2-135M-Instruct",
                        "device": "tpu",
                        "maxLoras": 4,
                        "autoscaling": {},
                        "podDisruptionBudget": {},
                    }
                ]
            },
            helm.HelmError,
            "device",
        ),
        (
            DATABASE
            | {
                "engines": [
                    {
                        "name": "gemma",
                        "baseModel": "gemma-3-270m",
                        "device": "cpu",
                        "maxLoras": 4,
                        "autoscaling": {},
                        "podDisruptionBudget": {},
                    }
                ]
            },
            helm.HelmError,
            "no engine serves the gateways' base model",
        ),
        (DATABASE | {"secrets": {"adminKey": "short"}}, helm.HelmError, "adminKey"),
        (DATABASE | {"jsonBackend": "xgrammar"}, helm.HelmError, "jsonWhitespace spaced needs jsonBackend guidance"),
        (DATABASE | {"jsonBackend": "auto", "jsonWhitespace": "compact"}, helm.HelmError, "or jsonWhitespace any"),
        (DATABASE | {"jsonCompact": True}, helm.HelmError, "jsonCompact was replaced by jsonWhitespace"),
    ],
    ids=[
        "no-database",
        "sqlite",
        "redis-not-a-url",
        "unknown-setting",
        "bad-device",
        "base-unserved",
        "short-admin-key",
        "spaced-json-on-xgrammar",
        "compact-json-on-auto",
        "json-compact-removed",
    ],
)
def test_bad_values_are_refused_with_the_fix(values: dict[str, Any], error: type[Exception], says: str) -> None:
    with pytest.raises(error) as caught:
        render(values)
    assert says in str(caught.value)
    assert "secret@" not in str(caught.value)  # a URL's password never appears in a message


def test_a_duplicate_engine_name_is_refused() -> None:
    engine = yaml.safe_load((CHART / "values.yaml").read_text())["engines"][0]
    with pytest.raises(helm.HelmError, match="used twice"):
        render(DATABASE | {"engines": [engine, engine]})


def test_redis_is_set_only_when_given() -> None:
    def gateway_env(values: dict[str, Any]) -> dict[str, Any]:
        [container] = containers(render(values), "gateway")
        return {v["name"]: v for v in container["env"]}

    assert "LORAFLEET_REDIS_URL" not in gateway_env(SCENARIOS["cpu"])
    ref = gateway_env(SCENARIOS["everything"])["LORAFLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = one(render(SCENARIOS["everything"]), "Secret", "lf-lorafleet-keys")
    assert ref["key"] in secret["data"]
    optional = gateway_env(SCENARIOS["existing-secret"])["LORAFLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert optional["optional"] is True  # a Secret of your own may leave Redis out


def test_workers_run_jobs_on_the_shared_volume_with_the_gateways_settings() -> None:
    """The worker sees the files and checkpoints where the gateways put them, with the same database; a Ray
    worker gets the cluster's address and each job's resources; KEDA scales it on the queue the gateways export."""
    docs = render(everything_on())
    worker = one(docs, "Deployment", "lf-lorafleet-worker")["spec"]["template"]["spec"]
    gateway = one(docs, "Deployment", "lf-lorafleet-gateway")["spec"]["template"]["spec"]

    def env(spec: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in spec["containers"][0]["env"]}

    shared = ("LORAFLEET_FILES_DIR", "LORAFLEET_JOBS_DIR", "LORAFLEET_DATABASE_URL", "LORAFLEET_BASE_MODEL")
    assert {k: env(worker)[k] for k in shared} == {k: env(gateway)[k] for k in shared}
    assert worker["containers"][0]["command"] == ["lorafleet", "worker"]
    assert json.loads(env(worker)["LORAFLEET_RAY_RESOURCES"]) == {"num_cpus": 4, "num_gpus": 0}
    assert env(worker)["LORAFLEET_EXECUTOR"] == "ray" and env(worker)["LORAFLEET_JOB_LEASE_S"] == "90"
    assert env(worker)["LORAFLEET_LORA_OPS"] == "grouped"  # the gate's engine, as the serving engines
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    from finetune.settings import WorkerSettings

    names = {e["name"].removeprefix("LORAFLEET_").lower() for e in worker["containers"][0]["env"]}
    assert names - {"home", "user", "logname"} <= set(WorkerSettings.model_fields) | {"database_url"}
    scaler = one(docs, "ScaledObject", "lf-lorafleet-worker")
    assert "lorafleet_finetune_jobs" in scaler["spec"]["triggers"][0]["metadata"]["query"]
