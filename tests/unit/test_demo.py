"""The demo's screen: one line per adapter from the store's training announcements, a curl per servable alias."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from contract.store import AdapterStore
from lorafleet.commands.demo import BackgroundTraining, Screen
from tests.conftest import make_adapter


def screen(tmp_path: Path) -> Screen:
    store = AdapterStore(tmp_path / "adapters")
    training = BackgroundTraining(store, tmp_path, ["orders", "toolcall"])
    keys = {"orders": "lf-orders-key", "toolcall": "lf-toolcall-key"}
    return Screen("http://127.0.0.1:8000", keys, training, tmp_path / "logs" / "gateway.log", tmp_path)


def test_progress_lines_follow_the_store(tmp_path: Path) -> None:
    s = screen(tmp_path)
    store = s.training.store
    s.training.current = "orders"
    assert s.progress_line("toolcall").split() == ["toolcall", "queued"]
    store.announce_training(
        "orders",
        {"phase": "training", "step": 30, "max_steps": 120, "loss": 0.03125, "tokens_per_s": 191.4, "eta_s": 275.0},
    )
    assert s.progress_line("orders").split() == [
        "orders",
        "training",
        "step",
        "30/120",
        "loss",
        "0.0312",
        "191",
        "tok/s",
        "ETA",
        "4:35",
    ]
    store.publish(make_adapter(tmp_path / "src"), "orders")
    assert s.progress_line("orders").split() == ["orders", "ready:", "served", "as", "orders@1"]
    assert s.servable() == ["base", "orders"]


def test_each_curl_is_a_request_the_gateway_takes(tmp_path: Path) -> None:
    s = screen(tmp_path)
    for alias in ("base", "orders", "toolcall"):
        words = shlex.split(s.curl(alias))
        assert words[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/chat/completions"]
        body = json.loads(words[words.index("-d") + 1])
        assert body["model"] == alias and body["messages"][0]["role"] == "user"
        key = "lf-toolcall-key" if alias == "toolcall" else "lf-orders-key"
        assert f"Authorization: Bearer {key}" in words
    assert json.loads(shlex.split(s.curl("toolcall"))[-1])["tools"][0]["type"] == "function"


def test_a_stopped_run_is_resumed_and_a_half_saved_one_is_not(tmp_path: Path) -> None:
    from lorafleet.commands.demo import _resumable, run_dir

    out = run_dir(tmp_path, "orders")
    assert not _resumable(out)
    checkpoint = tmp_path / "runs" / "orders.partial" / "checkpoints" / "checkpoint-80"
    checkpoint.mkdir(parents=True)
    assert not _resumable(out), "a checkpoint without its trainer state was cut off mid-save"
    (checkpoint / "trainer_state.json").write_text("{}")
    assert _resumable(out)


def test_with_gemma_two_engines_one_per_base_and_a_third_adapter(tmp_path: Path, monkeypatch) -> None:
    from contract.settings import CommonSettings
    from lorafleet.commands.demo import GEMMA_ALIAS, two_engines
    from serving.config import GatewaySettings
    from serving.engines.specs import engine_specs

    monkeypatch.delenv("LORAFLEET_ENGINES_FILE", raising=False)
    path = two_engines(CommonSettings(data_dir=tmp_path))
    gateway = GatewaySettings(data_dir=tmp_path, engines_file=path, admin_key="a" * 32)
    specs = {spec.name: spec for spec in engine_specs(gateway)}
    assert (
        set(specs) == {"smollm2", "gemma"} and specs["gemma"].base == "gemma-3-270m" and specs["smollm2"].base is None
    )
    assert specs["smollm2"].cpus != specs["gemma"].cpus  # a core (or half the cores) each
    s = screen(tmp_path)
    s.aliases.append(GEMMA_ALIAS)
    body = json.loads(shlex.split(s.curl(GEMMA_ALIAS))[-1])
    assert body["model"] == GEMMA_ALIAS and body["tools"][0]["type"] == "function"
    assert "Authorization: Bearer lf-toolcall-key" in shlex.split(s.curl(GEMMA_ALIAS))
    assert [line.split()[0] for line in map(s.progress_line, s.aliases)] == ["orders", "toolcall", GEMMA_ALIAS]
