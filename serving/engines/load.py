"""An engine's load, read from vLLM's own Prometheus exposition (what its ``/metrics`` serves).

- ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``: the scheduler's queue;
- ``vllm:kv_cache_usage_perc``: how full the KV cache is (0-1);
- ``vllm:lora_requests_info``: a gauge whose *labels* carry the LoRA state
  (``running_lora_adapters`` and ``waiting_lora_adapters``, comma-separated
  names, and ``max_lora``); vLLM sets the current label set to the current time
  and never removes older ones, so the current state is the series with the
  greatest value.

Engines started with several API servers or data parallelism expose one series
per engine index; the counts are summed, the LoRA sets joined.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_loras: int | None = None

    @property
    def queued(self) -> int:
        """Requests on the engine: running and waiting."""
        return self.running + self.waiting

    @property
    def working_set(self) -> frozenset[str]:
        """The adapters its requests need now (at most ``max_loras`` run at once)."""
        return self.running_adapters | self.waiting_adapters


def parse_load(exposition: str) -> EngineLoad:
    """The load in one scrape of vLLM's ``/metrics``; a metric that is missing counts as zero (or empty)."""
    running = waiting = 0.0
    kv: list[float] = []
    latest: tuple[float, dict[str, str]] | None = None
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
            elif sample.name == "vllm:kv_cache_usage_perc":
                kv.append(sample.value)
            elif sample.name == "vllm:lora_requests_info" and (latest is None or sample.value > latest[0]):
                latest = (sample.value, sample.labels)
    labels = latest[1] if latest is not None else {}
    max_lora = labels.get("max_lora", "")
    return EngineLoad(
        running=int(running),
        waiting=int(waiting),
        kv_cache_usage=max(kv, default=0.0),
        running_adapters=_names(labels.get("running_lora_adapters", "")),
        waiting_adapters=_names(labels.get("waiting_lora_adapters", "")),
        max_loras=int(max_lora) if max_lora.isdigit() else None,
    )


def _names(joined: str) -> frozenset[str]:
    return frozenset(name for name in joined.split(",") if name)
