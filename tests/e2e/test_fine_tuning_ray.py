"""The Ray executor against a real Ray head on loopback (``ray start --head``): a job submitted through Ray's Job
Submission SDK trains, publishes and is served by the live gateway; a cancel stops the Ray job."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.launch import free_port
from tests.conftest import ORDERS, Gateway, client
from tests.e2e.test_fine_tuning_e2e import ENDED, OPTIONS, at_step, wait_for

pytestmark = pytest.mark.e2e
ray_job_submission = pytest.importorskip("ray.job_submission")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on loopback for the module; its dashboard address (the Job Submission API)."""
    dashboard = free_port()
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the jobs' `python` is ours
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray = str(Path(sys.executable).parent / "ray")
    temp = tmp_path_factory.mktemp("ray")
    start = [
        ray,
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(100 << 20),
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ray_worker(e2e_gateway: Gateway, ray_head: str) -> Iterator[dict[str, Any]]:
    gateway = e2e_gateway.ensure_running()
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(gateway.running.data_dir),
        "LORAFLEET_BASE_MODEL": str(gateway.base_model),
        "LORAFLEET_EXECUTOR": "ray",
        "LORAFLEET_RAY_ADDRESS": ray_head,
        "LORAFLEET_RAY_RESOURCES": '{"num_cpus": 2}',
        "LORAFLEET_WORKER_POLL_S": "0.5",
        "LORAFLEET_JOB_HEARTBEAT_S": "1",
    }
    log = gateway.running.data_dir / "worker-ray.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet", "worker"], env=env, stdout=out, stderr=out)
    api = client(gateway)
    rows = (ORDERS / "train.jsonl").read_text().splitlines()[40:72]
    upload = api.files.create(file=("ray.jsonl", io.BytesIO(("\n".join(rows) + "\n").encode())), purpose="fine-tune")
    yield {"gateway": gateway, "training": upload.id, "address": ray_head}
    proc.terminate()
    proc.wait(timeout=90)


def ray_jobs_of(address: str, job_id: str) -> list[Any]:
    submitted = ray_job_submission.JobSubmissionClient(address).list_jobs()
    return [j for j in submitted if (j.metadata or {}).get("lorafleet_job") == job_id]


def test_a_job_trains_on_ray_and_is_served(ray_worker) -> None:
    api = client(ray_worker["gateway"])
    job = api.fine_tuning.jobs.create(
        model="SmolLM2-135M-Instruct",
        training_file=ray_worker["training"],
        suffix="ray",
        extra_body={"lorafleet": OPTIONS},
    )
    done = wait_for(api, job.id, lambda j: j.status in ENDED, timeout=400)
    assert done.status == "succeeded", done.error
    assert done.model_extra["lorafleet"]["executor"] == "ray"
    deadline = time.monotonic() + 60
    while (submitted := ray_jobs_of(ray_worker["address"], job.id)[0]).status == "RUNNING":
        assert time.monotonic() < deadline, "the Ray job did not end after its job succeeded"
        time.sleep(0.5)  # the runner has written `succeeded` and is exiting
    assert submitted.status == "SUCCEEDED" and "finetune.runner" in submitted.entrypoint
    answer = api.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert answer.model.split("@")[0] == done.fine_tuned_model


def test_cancelling_a_job_stops_its_ray_job(ray_worker) -> None:
    api = client(ray_worker["gateway"])
    job = api.fine_tuning.jobs.create(
        model="SmolLM2-135M-Instruct",
        training_file=ray_worker["training"],
        suffix="ray-cancelled",
        extra_body={"lorafleet": OPTIONS | {"max_steps": 60}},
    )
    wait_for(api, job.id, at_step(1), timeout=400)
    assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (submitted,) = ray_jobs_of(ray_worker["address"], job.id)
        if submitted.status in ("STOPPED", "FAILED"):
            break
        time.sleep(1)
    assert submitted.status in ("STOPPED", "FAILED"), submitted.status  # stopped by us, or by the runner itself
    assert api.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None
