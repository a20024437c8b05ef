"""The fleet's router (a pure function over engine snapshots) and the load it reads from vLLM's metrics."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engines.load import parse_load
from serving.engines.router import EngineView, route

ADAPTERS = [f"a{i}@1" for i in range(8)]


@st.composite
def fleets(draw: st.DrawFn) -> list[EngineView]:
    engines = []
    for i in range(draw(st.integers(1, 5))):
        max_loras = draw(st.integers(1, 4))
        resident = frozenset(draw(st.lists(st.sampled_from(ADAPTERS), max_size=max_loras, unique=True)))
        working = frozenset(draw(st.lists(st.sampled_from(sorted(resident)), unique=True))) if resident else frozenset()
        engines.append(
            EngineView(
                f"e{i}",
                draw(st.sampled_from(["B", "B", "C"])),
                max_loras,
                healthy=draw(st.booleans()) or i == 0,
                queued=draw(st.integers(0, 12)),
                resident=resident,
                working=working,
            )
        )
    return engines


@given(fleets(), st.sampled_from(ADAPTERS), st.sampled_from(["B", "C"]))
def test_only_a_healthy_engine_of_the_right_base_is_chosen(engines: list[EngineView], adapter: str, base: str) -> None:
    choice = route(engines, adapter, base)
    candidates = {e.name: e for e in engines if e.healthy and e.base == base}
    if not candidates:
        assert choice is None
        return
    assert choice is not None and choice.engine in candidates
    chosen = candidates[choice.engine]
    assert choice.load_adapter == (adapter not in chosen.resident)  # loads exactly when it is not there
    if choice.evict is not None:
        assert choice.evict in chosen.resident - chosen.working  # only an adapter no request needs is swapped out


@given(fleets(), st.sampled_from(ADAPTERS))
def test_affinity_within_the_bounded_load(engines: list[EngineView], adapter: str) -> None:
    candidates = [e for e in engines if e.healthy and e.base == "B"]
    if not candidates:
        return
    cap = max(1, math.ceil(1.25 * (sum(e.queued for e in candidates) + 1) / len(candidates)))
    choice = route(engines, adapter, "B")
    assert choice is not None
    chosen = next(e for e in candidates if e.name == choice.engine)
    fits = [
        e
        for e in candidates
        if adapter in e.resident and e.queued + 1 <= cap and len(e.working | {adapter}) <= e.max_loras
    ]
    if fits:  # held somewhere with room: served there, nothing loaded
        assert choice.reason == "resident" and not choice.load_adapter
        assert chosen.queued == min(e.queued for e in fits)
    if choice.reason == "resident":
        assert chosen.queued + 1 <= cap  # never beyond the bounded load


@given(st.integers(0, 20), st.sampled_from(ADAPTERS), st.booleans())
def test_one_engine_is_todays_gateway(queued: int, adapter: str, held: bool) -> None:
    engine = EngineView("only", "B", 4, queued=queued, resident=frozenset({adapter} if held else set()))
    choice = route([engine], adapter, "B")
    assert choice is not None and choice.engine == "only" and choice.load_adapter == (not held)


class Simulation:
    """Engines serving requests that last ``duration`` ticks; the router places each, residency follows."""

    def __init__(self, engines: int, max_loras: int, expected: list[str] | None = None) -> None:
        self.max_loras, self.expected = max_loras, expected or []
        self.resident: dict[str, set[str]] = {f"e{i}": set() for i in range(engines)}
        self.running: dict[str, list[tuple[int, str]]] = {name: [] for name in self.resident}  # (ends at, adapter)
        self.loads: Counter[str] = Counter()
        self.worst_working_set = 0

    def views(self) -> list[EngineView]:
        return [
            EngineView(
                name,
                "B",
                self.max_loras,
                queued=len(self.running[name]),
                resident=frozenset(self.resident[name]),
                working=frozenset(a for _, a in self.running[name]),
            )
            for name in self.resident
        ]

    def step(self, now: int, arrivals: list[str], duration: int) -> None:
        for name in self.running:
            self.running[name] = [(end, a) for end, a in self.running[name] if end > now]
        for adapter in arrivals:
            choice = route(self.views(), adapter, "B", expected=self.expected)
            assert choice is not None
            if choice.evict is not None:
                self.resident[choice.engine].discard(choice.evict)
            if choice.load_adapter:
                self.resident[choice.engine].add(adapter)
                self.loads[adapter] += 1
            self.running[choice.engine].append((now + duration, adapter))
            working = {a for _, a in self.running[choice.engine]}
            self.worst_working_set = max(self.worst_working_set, len(working))


def test_four_adapters_on_two_engines_with_two_slots_are_each_loaded_once() -> None:
    """The aliases fit the fleet's slots: each is loaded once, none thrashes, no working set goes over."""
    sim = Simulation(engines=2, max_loras=2, expected=ADAPTERS[:4])
    rng = random.Random(7)
    for now in range(400):
        arrivals = [rng.choice(ADAPTERS[:4]) for _ in range(rng.randint(0, 2))]
        sim.step(now, arrivals, duration=3)
    assert set(sim.loads) == set(ADAPTERS[:4]) and all(n == 1 for n in sim.loads.values()), sim.loads
    assert sim.worst_working_set <= 2


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 10_000))
def test_no_working_set_goes_over_max_loras_when_the_adapters_fit(engines: int, max_loras: int, seed: int) -> None:
    aliases = ADAPTERS[: engines * max_loras]  # exactly as many as the fleet has slots
    sim = Simulation(engines, max_loras, expected=aliases)
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(aliases))]  # Zipf-like popularity
    for now in range(150):
        sim.step(now, rng.choices(aliases, weights, k=rng.randint(0, engines)), duration=rng.randint(1, 4))
    assert sim.worst_working_set <= max_loras


def test_a_hot_adapter_spreads_and_a_cold_one_stays() -> None:
    sim = Simulation(engines=3, max_loras=2)
    for now in range(60):
        sim.step(now, ["a0@1"] * 6 + (["a1@1"] if now % 10 == 0 else []), duration=3)
    holders = [name for name, held in sim.resident.items() if "a0@1" in held]
    assert len(holders) == 3  # the hot one runs everywhere its load needs
    assert sum("a1@1" in held for held in sim.resident.values()) == 1  # the cold one on one engine


# -- what the router reads: vLLM's own metrics ----------------------------------------------------------------

EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="base"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="base"} 0.375
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="orders@1",waiting_lora_adapters=""} 1.7646e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="orders@1,toolcall@2",waiting_lora_adapters="sql@1"} \
1.7646001e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7645999e+09
"""


@given(fleets(), st.sampled_from(ADAPTERS), st.booleans(), st.integers(0, 40))
def test_a_merged_engine_takes_its_version_first_and_nothing_else(
    engines: list[EngineView], adapter: str, healthy: bool, queued: int
) -> None:
    fast = EngineView("fast", "merge-of-" + adapter, 1, healthy=healthy, queued=queued, merged=adapter)
    others = [a for a in ADAPTERS if a != adapter]
    choice = route([*engines, fast], adapter, "B")
    if healthy:  # its version goes there first, however busy: it is base-model speed, and loads nothing
        assert choice is not None and (choice.engine, choice.reason, choice.load_adapter) == ("fast", "merged", False)
    else:  # down: the LoRA path, exactly as without it
        assert choice == route(engines, adapter, "B")
    for other in others:  # no other adapter, and no request for its own base, ever goes there
        picked = route([*engines, fast], other, "B")
        assert picked is None or picked.engine != "fast"


def test_the_blind_baselines_take_turns_and_load_where_they_land() -> None:
    from serving.engines.router import route_blind

    engines = [
        EngineView("e1", "B", 2, resident=frozenset({"x@1", "y@1"}), working=frozenset({"x@1"})),
        EngineView("e2", "B", 2),
        EngineView("other", "C", 2),
    ]
    picks = [route_blind(engines, "z@1", "B", turn) for turn in range(4)]
    assert [p.engine for p in picks if p] == ["e1", "e2", "e1", "e2"]  # whatever they hold
    assert picks[0] is not None and (picks[0].load_adapter, picks[0].evict) == (True, "y@1")  # the idle one goes
    assert picks[1] is not None and picks[1].reason == "free_slot"
    full = [dataclasses.replace(engines[0], working=frozenset({"x@1", "y@1"}))]
    beyond = route_blind(full, "z@1", "B", 0)
    assert beyond is not None and (beyond.evict, beyond.reason) == (None, "least_loaded")  # over max_loras
    assert route_blind(engines, "x@1", "B", 0) == route(engines[:1], "x@1", "B")  # resident: nothing to load
    assert route_blind(engines, "z@1", "D", 0) is None


def test_the_load_is_read_from_vllms_metrics_the_latest_lora_series_wins() -> None:
    load = parse_load(EXPOSITION)
    assert (load.running, load.waiting, load.queued, load.kv_cache_usage) == (3, 2, 5, 0.375)
    assert load.running_adapters == {"orders@1", "toolcall@2"} and load.waiting_adapters == {"sql@1"}
    assert load.working_set == {"orders@1", "toolcall@2", "sql@1"} and load.max_loras == 2
    assert parse_load("") == parse_load("# nothing here\n")  # an engine without LoRA metrics: zeros
