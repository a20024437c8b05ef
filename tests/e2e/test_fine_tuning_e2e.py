"""Fine-tuning as a service, end to end: the official openai client against the live gateway (real vLLM), a
real worker process training SmolLM2 for a few steps, and the result served with no restart.

Each training here is a few steps on a few dozen rows (about half a minute, most of it loading the model), and
the module shares its uploads: the whole module is a handful of trainings.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from safetensors.numpy import load_file

from contract.store import AdapterStore
from tests.conftest import ORDERS, Gateway, client

pytestmark = pytest.mark.e2e

OPTIONS = {"max_steps": 6, "save_every": 2, "eval_every": 2, "max_length": 192}
ENDED = ("succeeded", "failed", "cancelled")


class WorkerProcess:
    """``lorafleet worker`` over the gateway's data, with a short lease (a killed worker's job moves on soon)."""

    def __init__(self, data_dir: Path, base_model: Path, name: str) -> None:
        env = os.environ | {
            "LORAFLEET_DATA_DIR": str(data_dir),
            "LORAFLEET_BASE_MODEL": str(base_model),
            "LORAFLEET_WORKER_POLL_S": "0.5",
            "LORAFLEET_JOB_HEARTBEAT_S": "1",
            "LORAFLEET_JOB_LEASE_S": "6",
        }
        self.log = data_dir / f"worker-{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorafleet", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=90)


@pytest.fixture(scope="module")
def ft(e2e_gateway: Gateway) -> Iterator[dict[str, Any]]:
    """The live gateway's tenant, its uploads, and a worker beside the gateway."""
    gateway = e2e_gateway.ensure_running()
    api = client(gateway)
    rows = (ORDERS / "train.jsonl").read_text().splitlines()[:40]
    training = api.files.create(
        file=("train.jsonl", io.BytesIO(("\n".join(rows) + "\n").encode())), purpose="fine-tune"
    )
    held = (ORDERS / "validation.jsonl").read_text().splitlines()[:8]
    validation = api.files.create(
        file=("val.jsonl", io.BytesIO(("\n".join(held) + "\n").encode())), purpose="fine-tune"
    )
    worker = WorkerProcess(gateway.running.data_dir, gateway.base_model, "first")
    state = {"gateway": gateway, "training": training.id, "validation": validation.id, "worker": worker}
    yield state
    state["worker"].stop()


def create(api: openai.OpenAI, ft: dict[str, Any], **fields: Any) -> Any:
    options = OPTIONS | fields.pop("options", {})
    return api.fine_tuning.jobs.create(
        model="SmolLM2-135M-Instruct",
        training_file=ft["training"],
        validation_file=ft["validation"],
        extra_body={"lorafleet": options},
        **fields,
    )


def wait_for(api: openai.OpenAI, job_id: str, done: Callable[[Any], bool], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        assert job.status not in ENDED, f"{job_id} ended {job.status}: {job.error}"
        time.sleep(0.5)
    raise AssertionError(f"{job_id}: still {job.status} after {timeout:.0f} s")


def at_step(n: int) -> Callable[[Any], bool]:
    return lambda job: (
        job.status == "running" and ((job.model_extra["lorafleet"]["progress"] or {}).get("step") or 0) >= n
    )


def weights(gateway: Gateway, model: str) -> dict[str, Any]:
    store = AdapterStore(gateway.running.data_dir / "adapters")
    version = store.serving(model)
    assert version is not None
    return load_file(str(version.path / "adapter_model.safetensors"))


def test_files_to_job_to_served_model_through_the_sdk_and_pause_resume_gives_the_same_adapter(ft) -> None:
    gateway: Gateway = ft["gateway"]
    api = client(gateway)
    straight = create(api, ft, seed=3, suffix="straight", metadata={"run": "straight"})
    paused = create(api, ft, seed=3, suffix="paused")
    assert straight.status == "validating_files"

    done = wait_for(api, straight.id, lambda j: j.status in ENDED)
    assert done.status == "succeeded", done.error
    succeeded_at = time.monotonic()
    answer = api.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Extract the order: Ana Lima (ana@lima.io) ordered #A-1, shipped."}],
        max_tokens=40,
        temperature=0,
    )
    first_answer_s = time.monotonic() - succeeded_at
    assert answer.choices[0].message.content and answer.model.split("@")[0] == done.fine_tuned_model
    assert first_answer_s < 30, first_answer_s  # generous: the gateway loads it within a second of `succeeded`
    assert done.fine_tuned_model.startswith("ft-smollm2-135m-instruct-straight-")
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.estimated_finish is None
    assert done.hyperparameters.batch_size == 8 and done.hyperparameters.learning_rate_multiplier == 1.0
    mine = {m.id: m for m in api.models.list()}
    assert mine[done.fine_tuned_model].owned_by == "acme"

    events = list(api.fine_tuning.jobs.list_events(done.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "valid_loss", "tokens_per_s"} <= set().union(*(m.data for m in metrics))
    evaluated = [m.data for m in metrics if "valid_loss" in m.data]
    assert evaluated and all(d["step"] % 2 == 0 for d in evaluated)  # each loss where it was measured
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed." and messages[-1] == "Validating training file."
    checkpoints = api.fine_tuning.jobs.checkpoints.list(done.id).data
    assert [c.step_number for c in checkpoints] == [6, 4, 2]
    assert checkpoints[0].metrics.valid_loss is not None and checkpoints[0].fine_tuning_job_id == done.id
    table = list(csv.DictReader(io.StringIO(api.files.content(done.result_files[0]).text)))
    assert [int(r["step"]) for r in table][-1] == 6 and any(r["valid_loss"] for r in table)

    wait_for(api, paused.id, at_step(3))
    api.fine_tuning.jobs.pause(paused.id)
    stopped = wait_for(api, paused.id, lambda j: j.status == "paused", timeout=120)
    step = (stopped.model_extra["lorafleet"]["progress"] or {}).get("step")
    assert step and step < 6
    assert api.fine_tuning.jobs.checkpoints.list(paused.id).data  # what it resumes from
    api.fine_tuning.jobs.resume(paused.id)
    resumed = wait_for(api, paused.id, lambda j: j.status in ENDED)
    assert resumed.status == "succeeded", resumed.error
    assert any("resumed at step" in e.message for e in api.fine_tuning.jobs.list_events(paused.id, limit=100))
    a, b = weights(gateway, done.fine_tuned_model), weights(gateway, resumed.fine_tuned_model)
    assert a.keys() == b.keys()
    for name in a:  # the same seed, the same data order and dropout draws: the same adapter (fp32 round-off)
        assert abs(a[name] - b[name]).max() < 1e-5, name


def test_a_cancelled_job_stops_training_and_publishes_nothing(ft) -> None:
    gateway: Gateway = ft["gateway"]
    api = client(gateway)
    job = create(api, ft, seed=1, suffix="cancelled", options={"max_steps": 40})
    wait_for(api, job.id, at_step(1))
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    work = gateway.running.data_dir / "jobs" / job.id
    deadline = time.monotonic() + 30
    while work.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not work.exists()  # the worker stopped the training and removed its checkpoints
    assert not _runner_alive(job.id)
    later = api.fine_tuning.jobs.retrieve(job.id)
    assert (later.status, later.fine_tuned_model, later.result_files) == ("cancelled", None, [])
    assert not [a for a in AdapterStore(gateway.running.data_dir / "adapters").aliases() if "cancelled" in a]
    with pytest.raises(openai.BadRequestError) as again:
        api.fine_tuning.jobs.cancel(job.id)
    assert again.value.code == "job_state"


def test_a_job_survives_a_gateway_restart_and_its_worker_being_killed(ft) -> None:
    gateway: Gateway = ft["gateway"]
    api = client(gateway)
    # Long enough to outlast a gateway restart (vLLM starts again), in small steps: 150 steps of one example,
    # a checkpoint every 10.
    job = create(
        api,
        ft,
        seed=2,
        suffix="survivor",
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1}}},
        options={"max_steps": 150, "save_every": 10, "eval_every": 10},
    )
    before = wait_for(api, job.id, at_step(2))
    gateway.running.stop()  # the gateway restarts; the job does not notice
    gateway.ensure_running()
    api = client(gateway)
    step = before.model_extra["lorafleet"]["progress"]["step"]
    during = wait_for(api, job.id, at_step(step + 2))  # it trained on while the gateway was away
    assert during.model_extra["lorafleet"]["workers_lost"] == 0
    ft["worker"].stop(signal.SIGKILL)  # the worker dies; its training dies with it
    deadline = time.monotonic() + 10
    while _runner_alive(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _runner_alive(job.id)
    ft["worker"] = WorkerProcess(gateway.running.data_dir, gateway.base_model, "second")
    done = wait_for(api, job.id, lambda j: j.status in ENDED)
    assert done.status == "succeeded", done.error
    assert done.model_extra["lorafleet"]["workers_lost"] == 1
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert any("stopped answering" in m for m in messages) and any("resumed at step" in m for m in messages)
    answer = api.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert answer.model.split("@")[0] == done.fine_tuned_model


def test_a_file_with_broken_lines_fails_its_job_naming_them(ft) -> None:
    api = client(ft["gateway"])
    bad = [*(ORDERS / "train.jsonl").read_text().splitlines()[:20], '{"messages": "not a list"}', "{broken"]
    upload = api.files.create(file=("bad.jsonl", io.BytesIO(("\n".join(bad) + "\n").encode())), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=upload.id)
    failed = wait_for(api, job.id, lambda j: j.status in ENDED, timeout=60)
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert "line 21" in failed.error.message and "line 22" in failed.error.message


def _runner_alive(job_id: str) -> bool:
    found = subprocess.run(["pgrep", "-f", f"finetune.runner --job {job_id}"], capture_output=True)
    return found.returncode == 0
