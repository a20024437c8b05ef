"""What fine-tuning through the API costs over training by hand, and how soon its model answers.

    python -m benchmarks.finetune                 # make bench-finetune
    python -m benchmarks.finetune --steps 20 --repeats 3

One run, one machine, the same data, steps and settings each way:

1. **direct**: ``lorafleet train`` (the baseline), wall time from the command to its exit;
2. **job**: the same training as a fine-tuning job through the gateway (openai SDK ``files.create`` and
   ``fine_tuning.jobs.create``, a ``lorafleet worker`` beside it), wall time from ``jobs.create`` to the job
   showing ``succeeded``;
3. **first answer**: from ``succeeded`` to the first 200 from ``chat.completions.create`` with the job's model;
4. **fairness**: three tenants each submit two tiny jobs at once (tenant a's first, then b's, c's, then their
   seconds); the order the one worker starts them in.

Prints a table with medians, the ratio against the direct run, and whether the goals hold: job ≤ 1.05 × direct
+ 10 s; first answer ≤ 10 s after ``succeeded``; every tenant's first job starts before any tenant's second.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai

from lorafleet.launch import start_gateway

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ROOT / "data" / "orders"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "bench-finetune")
    parser.add_argument("--base-model", type=Path, default=ROOT / "var" / "models" / "SmolLM2-135M-Instruct")
    args = parser.parse_args()
    shutil.rmtree(args.data_dir, ignore_errors=True)
    args.data_dir.mkdir(parents=True)
    data = args.data_dir / "train.jsonl"
    data.write_text("\n".join((ORDERS / "train.jsonl").read_text().splitlines()[: args.rows]) + "\n")
    # The recipe's settings (finetune/recipes/SmolLM2-135M-Instruct.yaml), one evaluation and one checkpoint at
    # the end: what a job with these options trains, flag for flag.
    options = {"max_steps": args.steps, "save_every": args.steps, "eval_every": args.steps, "max_length": 512}
    flags = [
        "--data",
        str(data),
        "--out",
        str(args.data_dir / "direct"),
        "--task",
        "orders",
        "--seed",
        "5",
        "--max-steps",
        str(args.steps),
        "--save-every",
        str(args.steps),
        "--eval-every",
        str(args.steps),
        "--val-fraction",
        "0.1",
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "8",
        "--rank",
        "16",
        "--alpha",
        "32",
        "--dropout",
        "0.05",
        "--targets",
        "attention-mlp",
        "--max-length",
        "512",
        "--warmup-ratio",
        "0.05",
        "--epochs",
        "10",
        "--log-every",
        "5",
        "--base-model",
        str(args.base_model),
    ]
    direct = [_direct(flags, args.data_dir) for _ in range(args.repeats)]
    print(f"direct runs: {', '.join(f'{x:.1f}' for x in direct)} s", flush=True)

    (args.data_dir / "gw").mkdir()
    gateway = start_gateway(args.data_dir / "gw", args.base_model, worker=False)
    worker = _worker(args.data_dir / "gw", args.base_model)
    try:
        keys = _tenants(args.data_dir / "gw", ["a", "b", "c"])
        api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=keys["a"], max_retries=0, timeout=120)
        upload = api.files.create(file=("train.jsonl", data.open("rb")), purpose="fine-tune")
        jobs, answers = [], []
        for _ in range(args.repeats):
            seconds, first = _job(api, upload.id, options)
            jobs.append(seconds)
            answers.append(first)
        order = _fairness(gateway.url, keys, data)
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        gateway.stop()
    _report(args, direct, jobs, answers, order)


def _direct(flags: list[str], data_dir: Path) -> float:
    shutil.rmtree(data_dir / "direct", ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "lorafleet", "train", *flags], check=True, capture_output=True, cwd=ROOT)
    return time.monotonic() - started


def _worker(data_dir: Path, base_model: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(data_dir),
        "LORAFLEET_BASE_MODEL": str(base_model),
        "LORAFLEET_WORKER_POLL_S": "0.5",
        "LORAFLEET_JOB_HEARTBEAT_S": "1",
    }
    log = (data_dir / "worker.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "lorafleet", "worker"], env=env, stdout=log, stderr=log)


def _tenants(data_dir: Path, names: list[str]) -> dict[str, str]:
    from serving.state.tenants import Limits, TenantStore

    store = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    return {
        name: store.issue_key(store.enroll(name, limits=Limits(running_jobs=1, queued_jobs=20))[0]) for name in names
    }


def _job(api: openai.OpenAI, file_id: str, options: dict[str, Any]) -> tuple[float, float]:
    """Seconds from ``jobs.create`` to ``succeeded``, and from there to the model's first 200."""
    started = time.monotonic()
    job = api.fine_tuning.jobs.create(
        model="SmolLM2-135M-Instruct", training_file=file_id, seed=5, extra_body={"lorafleet": options}
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        job = api.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} {job.status}: {job.error}")
    done = time.monotonic()
    while True:
        try:
            api.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            break
        except (openai.NotFoundError, openai.APIStatusError):
            time.sleep(0.1)
    return done - started, time.monotonic() - done


def _fairness(url: str, keys: dict[str, str], data: Path) -> list[str]:
    """Three tenants, two tiny jobs each, submitted a1 a2 b1 b2 c1 c2; the order the worker starts them in."""
    apis = {n: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0) for n, k in keys.items()}
    small = "\n".join(data.read_text().splitlines()[:40]).encode() + b"\n"
    made: dict[str, str] = {}
    for name, api in apis.items():
        upload = api.files.create(file=("small.jsonl", io.BytesIO(small)), purpose="fine-tune")
        for n in (1, 2):
            job = api.fine_tuning.jobs.create(
                model="SmolLM2-135M-Instruct",
                training_file=upload.id,
                extra_body={"lorafleet": {"max_steps": 1, "save_every": 1, "max_length": 256}},
            )
            made[job.id] = f"{name}{n}"
    started: dict[str, str] = {}
    deadline = time.monotonic() + 1800
    while len(started) < len(made) and time.monotonic() < deadline:
        for job_id, label in made.items():
            if job_id in started:
                continue
            api = apis[label[0]]
            events = api.fine_tuning.jobs.list_events(job_id, limit=100).data
            start = next((e for e in events if e.message.startswith("Fine-tuning job started")), None)
            if start is not None:
                started[job_id] = start.id
        time.sleep(1)
    return [made[j] for j in sorted(started, key=lambda j: int(started[j].removeprefix("ftevent-")))]


def _report(
    args: argparse.Namespace, direct: list[float], jobs: list[float], answers: list[float], order: list[str]
) -> None:
    d, j, a = statistics.median(direct), statistics.median(jobs), statistics.median(answers)
    firsts = [o for o in order if o.endswith("1")]
    fair = order[: len(firsts)] == firsts and len(order) == 6
    print(f"\n{args.steps} steps, {args.rows} rows of data/orders/train.jsonl, {args.repeats} runs each, medians\n")
    print("| run | median s | runs (s) | ratio to direct |\n|---|---:|---|---:|")
    print(f"| `lorafleet train` (direct, baseline) | {d:.1f} | {', '.join(f'{x:.1f}' for x in direct)} | 1.00 |")
    print(
        f"| job through the API: create → succeeded | {j:.1f} | {', '.join(f'{x:.1f}' for x in jobs)} | {j / d:.2f} |"
    )
    print(f"| succeeded → first 200 from the model | {a:.1f} | {', '.join(f'{x:.1f}' for x in answers)} | |")
    print(f"\nthree tenants, two jobs each, started in the order: {' '.join(order)}")
    goals = [
        (f"job ≤ 1.05 × direct + 10 s ({1.05 * d + 10:.1f} s)", j <= 1.05 * d + 10),
        ("first answer ≤ 10 s after succeeded", a <= 10),
        ("every tenant's first job starts before any tenant's second", fair),
    ]
    for goal, held in goals:
        print(f"- {goal}: {'holds' if held else 'MISSED'}")


if __name__ == "__main__":
    main()
