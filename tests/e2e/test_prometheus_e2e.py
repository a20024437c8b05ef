"""A real Prometheus (Debian's package) scrapes the live gateway and vLLM under real traffic.

What Prometheus computes from the scrapes (JSON validity, latency quantiles)
must agree with what the test sent and saw; the shipped config, alert rules
and dashboard queries must load and run there; ``lorafleet report`` must
render from it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.launch import free_port
from serving.metrics import E2E_BUCKETS
from tests.conftest import ORDERS, ROOT, Gateway
from tests.promql import DEPLOY, as_promql, dashboard_queries, metric_names

SCRAPE_S = 1
FLAG = {
    "type": "json_schema",
    "json_schema": {
        "name": "flag",
        "schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def prometheus(e2e_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gw = e2e_gateway.ensure_running()
    # One routed request first, so every series exists before Prometheus's first scrape.
    warm = _chat(gw, "Order 1: Ana Lopez, ana@x.io, shipped.")
    assert warm.status_code == 200, warm.text
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is missing: `apt-get install prometheus` (make test does it)")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())  # the shipped config, pointed at this gateway
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    (work / "metrics.key").write_text("any")  # the test gateway listens on loopback: its metrics are open
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [gw.url.removeprefix("http://")]}]
        job["authorization"]["credentials_file"] = str(work / "metrics.key")  # compose mounts it elsewhere
    shutil.copy(DEPLOY / "alerts.yml", work / "alerts.yml")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (work / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: _ok(f"{url}/-/ready"), 60, "Prometheus ready")
        _wait(lambda: _value(url, 'min(up{job=~"lorafleet|vllm"})') == 1.0, 60, "both targets up")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _chat(gw: Gateway, prompt: str, **body: object) -> httpx.Response:
    payload = {
        "model": "orders",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 48,
        "temperature": 0,
    } | body
    return httpx.post(
        f"{gw.url}/v1/chat/completions", json=payload, timeout=120, headers={"Authorization": f"Bearer {gw.key}"}
    )


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def _query(url: str, promql: str, at: float | None = None) -> list[dict]:
    params: dict[str, object] = {"query": promql} | ({"time": at} if at is not None else {})
    data = httpx.get(f"{url}/api/v1/query", params=params, timeout=30).json()
    assert data["status"] == "success", (promql, data)
    return list(data["data"]["result"])


def _value(url: str, promql: str, at: float | None = None) -> float | None:
    result = _query(url, promql, at)
    return float(result[0]["value"][1]) if result else None


def _scraped_after(url: str, moment: float) -> None:
    """Wait until Prometheus holds a scrape of the gateway taken after ``moment``."""
    _wait(lambda: (_value(url, 'timestamp(up{job="lorafleet"})') or 0) > moment + SCRAPE_S, 30, "a fresh scrape")


def test_validity_and_latency_from_prometheus_agree_with_the_traffic(prometheus: str, live_gateway: Gateway) -> None:
    base = time.time()
    _scraped_after(prometheus, base)
    base = time.time()
    _scraped_after(prometheus, base)
    prompts = [json.loads(line)["instruction"] for line in (ORDERS / "test.jsonl").read_text().splitlines()[:10]]
    outcomes, latencies = [], []
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        # A mix the judge tells apart: half enforced to a small schema (valid), half free and cut short.
        body = {"response_format": FLAG} if i % 2 else {"max_tokens": 12}
        resp = _chat(live_gateway, prompt, **body)
        latencies.append(time.perf_counter() - started)
        assert resp.status_code == 200, resp.text
        outcomes.append(resp.headers["x-lorafleet-json"])
    end = time.time()
    _scraped_after(prometheus, end)

    def delta(selector: str) -> str:  # the increase from base to now, exactly (no extrapolation)
        return f"(sum({selector}) - (sum({selector} @ {base:.3f}) or vector(0)))"

    checks = 'lorafleet_json_checks_total{alias="orders"}'
    valid = 'lorafleet_json_checks_total{alias="orders", outcome="valid"}'
    assert {"valid"} < set(outcomes), outcomes  # both kinds, so the ratio below means something
    assert _value(prometheus, delta(checks)) == len(prompts)
    assert _value(prometheus, f"{delta(valid)} / {delta(checks)}") == pytest.approx(
        outcomes.count("valid") / len(outcomes)
    )
    assert _value(prometheus, delta('lorafleet_request_duration_seconds_count{alias="orders"}')) == len(prompts)

    bucket = 'lorafleet_request_duration_seconds_bucket{alias="orders"}'
    p50 = _value(prometheus, f"histogram_quantile(0.5, sum by (le) ({bucket} - {bucket} @ {base:.3f}))")
    observed = statistics.median(latencies)
    bounds = (0.0, *E2E_BUCKETS)
    width = next(hi - lo for lo, hi in itertools.pairwise(bounds) if observed <= hi)
    assert p50 is not None and abs(p50 - observed) <= width, (p50, observed, width)  # within one bucket's resolution


def test_promtool_accepts_the_live_gateways_scrape(prometheus: str, live_gateway: Gateway) -> None:
    scrape = httpx.get(f"{live_gateway.url}/metrics", timeout=10).text
    assert 'lorafleet_requests_total{alias="orders"' in scrape  # real traffic went through
    lint = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_shipped_rules_load_and_dashboard_queries_run(prometheus: str, live_gateway: Gateway) -> None:
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"lorafleet-recording", "lorafleet-alerts", "lorafleet-finetune"}
    assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups
    engine_names = {
        line.split("{")[0].split(" ")[0]
        for line in httpx.get(f"{live_gateway.url}/metrics/engine", timeout=10).text.splitlines()
        if line and not line.startswith("#")
    }
    for title, expr in dashboard_queries():
        _query(prometheus, as_promql(expr))  # Prometheus runs it
        for name in metric_names(as_promql(expr)):
            if name.startswith("vllm:"):
                assert name in engine_names, f"panel {title!r} reads {name!r}, which this vLLM does not export"


def test_lorafleet_report_renders_from_prometheus(prometheus: str, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "report",
            "--prometheus",
            prometheus,
            "--window",
            "5m",
            "--rate",
            "10s",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "orders p95" in result.stdout and "JSON valid" in result.stdout
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "report",
            "--prometheus",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "x.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode != 0 and "cannot reach Prometheus" in down.stderr + down.stdout
