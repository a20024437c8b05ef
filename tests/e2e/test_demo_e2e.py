"""The first run, end to end: `lorafleet demo` answers `base` at once and each demo alias as its training ends.

Real vLLM, real gateway, real (tiny) trainings as fine-tuning jobs through the
gateway's API, run by the worker beside it; the demo's training configs are
swapped for tiny ones (``--configs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from contract.store import AdapterStore
from lorafleet.launch import free_port
from tests.conftest import ORDERS, ROOT


def _config(path: Path, data: Path, steps: int, task: str) -> None:
    path.write_text(
        json.dumps(
            {
                "task": task,
                "data": str(data),
                "schema": str(ORDERS / "schema.json"),
                "out": "unused",
                "rank": 4,
                "alpha": 8,
                "max_steps": steps,
                "batch_size": 4,
                "learning_rate": 2e-3,
                "max_length": 160,
                "val_fraction": 0.25,  # a job into an alias is gated on the share it held out
                "log_every": 1,
                "save_every": 2,
            }
        )
    )


def _jobs(data: Path, alias: str) -> list[Any]:
    from serving.state.db import state_engine
    from serving.state.jobs import JobStore

    return JobStore(state_engine(f"sqlite:///{data / 'state.db'}")).page(None, metadata={"demo": alias})[0]


def _lenient_gate(data: Path, alias: str) -> None:
    """Four steps do not make a good adapter: the operator lets anything through the gate of this alias (what is
    tested here is the first run's flow; the gate's verdicts are tests/e2e/test_rollout_e2e.py's)."""
    from serving.state.db import state_engine
    from serving.state.policies import AliasPolicies, GateThresholds, RolloutPolicy

    data.mkdir()
    lenient = RolloutPolicy(gate=GateThresholds(min_valid=0, min_field_accuracy=0, max_drop=1))
    AliasPolicies(state_engine(f"sqlite:///{data / 'state.db'}")).set_rollout(alias, lenient)


def _until_promoted(data: Path, alias: str, timeout: float = 30) -> None:
    """A gateway promotes a first version within a second of its job's end."""
    deadline = time.monotonic() + timeout
    while _jobs(data, alias)[0].rollout_state != "promoted":
        assert time.monotonic() < deadline, _jobs(data, alias)[0].rollout
        time.sleep(0.5)


def _interrupt_while_training(demo: subprocess.Popen, store: AdapterStore, out: Path, deadline: float) -> None:
    """Ctrl-C while `toolcall` trains: the child checkpoints and stops, the gateway stops, nothing hangs."""
    while time.monotonic() < deadline and not (store.training("toolcall") or {}).get("step"):
        assert demo.poll() is None, out.read_text()[-3000:]
        time.sleep(0.3)
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=180) == 0, out.read_text()[-3000:]


def _assert_queued_with_its_checkpoint(data: Path, store: AdapterStore) -> None:
    """The worker stopped with the demo: the job checkpointed and went back to the queue for the next run."""
    (toolcall,) = _jobs(data, "toolcall")
    assert toolcall.status == "queued", toolcall
    assert list((data / "jobs" / toolcall.id / "adapter.partial" / "checkpoints").glob("checkpoint-*"))
    assert store.latest("toolcall") is None and store.training("toolcall") is None
    assert not (data / "gateway.json").exists()


def _chat(url: str, key: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_the_demo_serves_base_at_once_and_each_adapter_when_trained(
    base_model: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    _config(configs / "orders.yaml", tiny_train_file, 4, "orders")
    _config(configs / "toolcall.yaml", tiny_train_file, 200, "orders")  # long enough to be stopped mid-way
    data, port = tmp_path / "data", free_port()
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(data),
        "LORAFLEET_BASE_MODEL": str(base_model),
        "LORAFLEET_PORT": str(port),
        "LORAFLEET_ENGINE_PORT": str(free_port()),
    }
    env.pop("LORAFLEET_ADMIN_KEY", None)
    _lenient_gate(data, "orders")
    url, out = f"http://127.0.0.1:{port}", tmp_path / "demo.out"
    with out.open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "demo", "--configs", str(configs)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    store = AdapterStore(data / "adapters")
    try:
        key_file = data / "demo-keys" / "orders.key"
        deadline = time.monotonic() + 600
        seen: list[int] = []
        training_refusal = None
        base: httpx.Response | None = None
        while time.monotonic() < deadline:
            assert demo.poll() is None, out.read_text()[-3000:]
            if not key_file.is_file():
                time.sleep(0.5)
                continue
            key = key_file.read_text().strip()
            if base is None or base.status_code != 200:  # once answered, left alone: the engine's load would
                with contextlib.suppress(httpx.HTTPError):  # starve the low-priority training this test waits for
                    base = _chat(url, key, "base")
                time.sleep(0.5)
                continue
            orders = _chat(url, key, "orders")
            seen.append(orders.status_code)
            if orders.status_code == 503 and orders.json()["error"]["code"] == "model_training":
                training_refusal = orders
                queued = _chat(url, (data / "demo-keys" / "toolcall.key").read_text().strip(), "toolcall")
                assert queued.status_code == 503 and "queued" in queued.json()["error"]["message"], queued.text
            if orders.status_code == 200:
                break
            time.sleep(1.0)
        assert seen and seen[-1] == 200, (seen, out.read_text()[-3000:])
        assert base is not None and base.headers["x-lorafleet-adapter"] == "base"
        # Before its adapter was published, `orders` was training: 503 with the ETA, never 404.
        assert 404 not in seen
        assert training_refusal is not None, seen
        assert "still training" in training_refusal.json()["error"]["message"]
        assert 5 <= int(training_refusal.headers["retry-after"]) <= 600
        assert orders.headers["x-lorafleet-adapter"] == "orders@1"
        # Trained as a fine-tuning job of the demo tenant, through the API, into its alias.
        (job,) = _jobs(data, "orders")
        assert (job.status, job.fine_tuned_model, job.options["max_steps"]) == ("succeeded", "orders", 4)
        assert job.rollout["gate"]["against"] == "base"  # gated against the base model, then made stable
        _until_promoted(data, "orders")
        assert store.stable("orders").version == 1  # type: ignore[union-attr]

        _interrupt_while_training(demo, store, out, deadline)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = out.read_text()
    assert "# base" in text and "# orders" in text and "curl -s" in text, text[-3000:]
    _assert_queued_with_its_checkpoint(data, store)
