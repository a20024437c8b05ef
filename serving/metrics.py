"""The gateway's Prometheus metrics.

Every request leaves a ``serving.records.RequestRecord``; when the response
ends, ``GatewayMetrics.observe`` turns it into metrics.

Names follow Prometheus's conventions: a ``lorafleet_`` prefix, base units,
``_seconds`` and ``_total`` suffixes, help on each. Label sets are bounded:

- ``alias``, ``version``, ``variant`` only once a request has been routed to an
  adapter the store holds (a bogus alias is a rejection, with no alias label);
- ``route`` is the matched route's template, or ``unmatched``;
- ``reason``, ``outcome``, ``mode``, ``status_class`` come from fixed lists;
- tenants are no label by default; ``LORAFLEET_METRICS_TENANT_LABEL=1`` adds
  ``lorafleet_tenant_requests_total`` with the first ``metrics_max_tenants``
  tenants seen by name and every later one as ``other``.

State that lives elsewhere (engine up, restarts, adapters on the engine,
canary weights) is read when Prometheus scrapes, by ``StateCollector``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.records import RequestRecord

# Buckets suited to LLM latencies, the ones vLLM uses for the same quantities.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
# A fine-tuning job: from seconds (a few steps) to a day.
JOB_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REJECTION_REASONS = ("auth", "not_found", "limit", "schema", "too_large", "invalid_request", "unavailable")
ADAPTER = ("alias", "version", "variant")


def rejection_reason(status: int, code: str | None) -> str:
    """The bounded ``reason`` label of a request the gateway refused."""
    if status in (401, 403):
        return "auth"
    if status in (404, 405):
        return "not_found"
    if status == 429:
        return "limit"
    if status == 413:
        return "too_large"
    if status >= 500:
        return "unavailable"
    if code and code.startswith("schema"):
        return "schema"
    return "invalid_request"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class GatewayMetrics:
    """Every metric the gateway exports, in a registry of its own (one per app)."""

    def __init__(self, *, tenant_label: bool = False, max_tenants: int = 20) -> None:
        disable_created_metrics()  # no *_created series: they double the count and no query here reads them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lorafleet_requests",
            "Requests routed to an adapter version, by status class.",
            [*ADAPTER, "status_class"],
            registry=r,
        )
        self.latency = Histogram(
            "lorafleet_request_duration_seconds",
            "End-to-end latency of routed requests.",
            ADAPTER,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time to the first token (streams).",
            ADAPTER,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Time per output token after the first (streams).",
            ADAPTER,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens of routed requests.", ADAPTER, registry=r
        )
        self.output_tokens = Counter(
            "lorafleet_generation_tokens", "Output tokens of routed requests.", ADAPTER, registry=r
        )
        self.json_checks = Counter(
            "lorafleet_json_checks",
            "JSON answers judged by the shared judge, by outcome and JSON mode.",
            [*ADAPTER, "mode", "outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "lorafleet_rejections", "Requests the gateway refused, by reason.", ["reason"], registry=r
        )
        self.http = Counter(
            "lorafleet_http_responses",
            "Every HTTP response, by route template and status class.",
            ["route", "status_class"],
            registry=r,
        )
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests being served now.", registry=r)
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads", "Adapter loads onto the engine, by outcome.", ["outcome"], registry=r
        )
        self.adapter_unloads = Counter("lorafleet_adapter_unloads", "Adapter unloads from the engine.", registry=r)
        self.failovers = Counter(
            "lorafleet_engine_failovers",
            "Requests moved to another engine before their first "
            "byte, by the engine that failed them (one of the configured engines).",
            ["engine"],
            registry=r,
        )
        # Per engine (the label takes only the engines the gateway was configured with, or discovered).
        self.engine_loads = Counter(
            "lorafleet_fleet_adapter_loads", "Adapter loads, by engine and outcome.", ["engine", "outcome"], registry=r
        )
        self.engine_unloads = Counter(
            "lorafleet_fleet_adapter_unloads",
            "Adapter unloads, by engine and cause "
            "(retired: its version left service; evicted: swapped out for another).",
            ["engine", "cause"],
            registry=r,
        )
        self.routed = Counter(
            "lorafleet_fleet_routed",
            "Requests routed to an engine, by the routing rule that chose "
            "it (resident, free_slot, idle_slot, queued_at_resident, least_loaded, merged, base).",
            ["engine", "reason"],
            registry=r,
        )
        self.load_duration = Histogram(
            "lorafleet_adapter_load_duration_seconds", "Time to load an adapter.", buckets=LOAD_BUCKETS, registry=r
        )
        self.canary_decisions = Counter(
            "lorafleet_canary_decisions", "Canary analysis decisions, by outcome.", ["alias", "outcome"], registry=r
        )
        # Fine-tuning jobs: each job's end is counted once, by whichever gateway reads it first
        # (``serving.state.jobs.JobStore.to_report``); the queue's state is read from the database (JobsCollector).
        self.jobs_finished = Counter(
            "lorafleet_finetune_jobs_finished", "Fine-tuning jobs that ended, by status.", ["status"], registry=r
        )
        self.job_queue_wait = Histogram(
            "lorafleet_finetune_queue_wait_seconds",
            "From a job's creation to its training's first start (validation included).",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_run_time = Histogram(
            "lorafleet_finetune_run_seconds",
            "From a job's first start to its end, by how it ended.",
            ["status"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.trained_tokens = Counter(
            "lorafleet_finetune_trained_tokens", "Tokens trained on by succeeded jobs.", registry=r
        )
        for status in ("succeeded", "failed", "cancelled"):
            self.jobs_finished.labels(status)
        self.tenant_requests: Counter | None = None
        self.max_tenants = max_tenants
        self._tenants: set[str] = set()
        if tenant_label:
            self.tenant_requests = Counter(
                "lorafleet_tenant_requests",
                "Requests per tenant (opt-in; tenants past the cap count as 'other').",
                ["tenant", "status_class"],
                registry=r,
            )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # every reason exists from the start: rate() needs a zero
        for outcome in ("success", "failure"):
            self.adapter_loads.labels(outcome)

    def add_state(self, collector: Collector) -> None:
        self.registry.register(collector)

    def observe(self, rec: RequestRecord) -> None:
        self.http.labels(rec.route, status_class(rec.status)).inc()
        if rec.rejection:
            self.rejections.labels(rec.rejection).inc()
        if self.tenant_requests is not None and rec.tenant:
            self.tenant_requests.labels(self._tenant_label(rec.tenant), status_class(rec.status)).inc()
        if rec.alias is None:
            return
        labels = (rec.alias, str(rec.version), rec.variant or "stable")
        self.requests.labels(*labels, status_class(rec.status)).inc()
        if rec.status != 200:
            return
        self.latency.labels(*labels).observe(rec.latency)
        if rec.ttft is not None:
            self.ttft.labels(*labels).observe(rec.ttft)
        if rec.tpot is not None:
            self.tpot.labels(*labels).observe(rec.tpot)
        if rec.prompt_tokens:
            self.prompt_tokens.labels(*labels).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.output_tokens.labels(*labels).inc(rec.completion_tokens)
        for outcome in rec.json_outcomes:
            self.json_checks.labels(*labels, rec.json_mode or "validate", outcome).inc()

    def _tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < self.max_tenants:
            self._tenants.add(tenant)
            return tenant
        return "other"

    def forget_engine(self, engine: str) -> None:
        """Drop every series labelled with an engine that has left the fleet (discovered pods come and go: their
        addresses must not pile up as series)."""
        labelled = {
            self.failovers: ("engine",),
            self.engine_loads: ("engine", "outcome"),
            self.engine_unloads: ("engine", "cause"),
            self.routed: ("engine", "reason"),
        }
        for metric, names in labelled.items():
            children = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples}
            for values in children:
                if values[0] == engine:
                    metric.remove(*values)

    def adapter_loaded(self, seconds: float, ok: bool, engine: str = "engine") -> None:
        outcome = "success" if ok else "failure"
        self.adapter_loads.labels(outcome).inc()
        self.engine_loads.labels(engine, outcome).inc()
        if ok:
            self.load_duration.observe(seconds)

    def adapter_unloaded(self, engine: str, evicted: bool) -> None:
        self.adapter_unloads.inc()
        self.engine_unloads.labels(engine, "evicted" if evicted else "retired").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JobsCollector(Collector):
    """The fine-tuning queue as the gateway last read it from the state database (``snapshot``: refreshed by the
    gateway every few seconds, never read at scrape time)."""

    STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"jobs": {}, "oldest_queued_s": 0.0, "workers": 0}

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("lorafleet_finetune_jobs", "Fine-tuning jobs, by status.", labels=["status"])
        for status in self.STATUSES:
            jobs.add_metric([status], float(self.snapshot["jobs"].get(status, 0)))
        yield jobs
        yield GaugeMetricFamily(
            "lorafleet_finetune_oldest_queued_seconds",
            "How long the oldest queued job has waited for a worker (0: none waits).",
            value=float(self.snapshot["oldest_queued_s"]),
        )
        yield GaugeMetricFamily(
            "lorafleet_finetune_workers",
            "Fine-tuning workers heard from in the last 30 s.",
            value=self.snapshot["workers"],
        )


class StateCollector(Collector):
    """Gauges read at scrape time from the objects that own the state."""

    def __init__(
        self,
        engine_up: Callable[[], bool],
        engine_restarts: Callable[[], int],
        adapters_active: Callable[[], int],
        canary_weights: Callable[[], dict[str, float]],
        adapters_pending: Callable[[], int] = lambda: 0,
        engines: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        self.engine_up, self.engine_restarts = engine_up, engine_restarts
        self.adapters_active, self.canary_weights = adapters_active, canary_weights
        self.adapters_pending = adapters_pending
        self.engines = engines

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "lorafleet_engine_up", "1 when the engine answers its health check.", value=1.0 if self.engine_up() else 0.0
        )
        yield CounterMetricFamily(
            "lorafleet_engine_restarts", "Times the supervisor restarted the engine.", value=self.engine_restarts()
        )
        yield GaugeMetricFamily(
            "lorafleet_adapters_active", "Adapter versions loaded on the engine.", value=self.adapters_active()
        )
        yield GaugeMetricFamily(
            "lorafleet_adapters_pending",
            "Aliases whose serving version is not loaded while the engine is up (a misfit, or a "
            "failed load: see /readyz with the admin key, and the log).",
            value=self.adapters_pending(),
        )
        weights = GaugeMetricFamily(
            "lorafleet_canary_weight", "Share of an alias's traffic on its canary (0-1).", labels=["alias"]
        )
        for alias, weight in sorted(self.canary_weights().items()):
            weights.add_metric([alias], weight)
        yield weights
        # Per engine: the label takes only the configured engines' names (the engines file), so it is bounded.
        up = GaugeMetricFamily(
            "lorafleet_fleet_engine_up", "1 when the engine is in routing (healthy).", labels=["engine"]
        )
        queued = GaugeMetricFamily(
            "lorafleet_fleet_engine_requests",
            "Requests on the engine, by state (vLLM's own running and waiting, the gateway's in flight).",
            labels=["engine", "state"],
        )
        held = GaugeMetricFamily("lorafleet_fleet_engine_adapters", "Adapters the engine holds.", labels=["engine"])
        for engine in self.engines():
            name = str(engine["name"])
            up.add_metric([name], 1.0 if engine["healthy"] else 0.0)
            for state in ("running", "waiting", "in_flight"):
                queued.add_metric([name, state], float(engine[state]))
            held.add_metric([name], float(len(engine["adapters"])))
        yield up
        yield queued
        yield held
