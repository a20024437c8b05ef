"""The demo: its adapters as fine-tuning jobs through the API (one line per job on its screen), a curl per servable
alias."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob

from contract.store import AdapterStore
from lorafleet.commands.demo import DemoJobs, Screen, demo_keys
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, fake_base

ROOT = Path(__file__).resolve().parents[2]


def screen(tmp_path: Path) -> Screen:
    store = AdapterStore(tmp_path / "adapters")
    keys = {"orders": "lf-orders-key", "toolcall": "lf-toolcall-key"}
    training = DemoJobs("http://127.0.0.1:8000", keys, store, ["orders", "toolcall"])
    return Screen("http://127.0.0.1:8000", keys, training, tmp_path / "logs" / "gateway.log", tmp_path)


def _job(status: str, **fields: object) -> FineTuningJob:
    return FineTuningJob.model_validate(
        {
            "id": "ftjob-1",
            "object": "fine_tuning.job",
            "created_at": 1,
            "model": "SmolLM2-135M-Instruct",
            "organization_id": "orders",
            "result_files": [],
            "seed": 0,
            "status": status,
            "training_file": "file-1",
            "hyperparameters": {},
            **fields,
        }
    )


def test_progress_lines_follow_the_jobs_and_the_store(tmp_path: Path) -> None:
    s = screen(tmp_path)
    s.ready_at = time.monotonic()
    assert s.progress_line("toolcall").split() == ["toolcall", "queued"]
    s.training.jobs["toolcall"] = _job("validating_files")
    assert s.progress_line("toolcall").split() == ["toolcall", "queued", "ftjob-1"]
    progress = {"step": 30, "total_steps": 120, "train_loss": 0.03125, "tokens_per_s": 191.4}
    s.training.jobs["orders"] = _job(
        "running", estimated_finish=int(time.time()) + 276, lorafleet={"progress": progress}
    )
    line = s.progress_line("orders").split()
    assert line[:9] == ["orders", "training", "ftjob-1", "step", "30/120", "loss", "0.0312", "191", "tok/s"]
    assert line[9] == "ETA" and line[10] in ("4:35", "4:36")
    s.training.jobs["toolcall"] = _job(
        "failed",
        error={"code": "invalid_file", "message": "training_file file-1 has 1 problem(s)", "param": "training_file"},
    )
    assert "has 1 problem(s)" in s.progress_line("toolcall")
    s.training.store.publish(make_adapter(tmp_path / "src"), "orders")
    assert s.progress_line("orders").split() == ["orders", "ready:", "served", "as", "orders@1"]
    assert s.servable() == ["base", "orders"]


def test_the_demo_trains_its_adapters_as_jobs_through_the_api_with_its_configs_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo is a tenant like any other: it uploads its data and creates a job into its alias with the config's
    settings; a second start follows the job it finds instead of making another."""
    from contract.settings import CommonSettings
    from finetune.recipes import recipe
    from serving.app import build_app
    from serving.config import GatewaySettings

    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    keys = demo_keys(CommonSettings(data_dir=tmp_path))
    monkeypatch.chdir(ROOT)
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        jobs = DemoJobs(
            "http://testserver", keys, AdapterStore(settings.adapters_dir), ["orders"], base_model="base-model"
        )
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=keys["orders"], http_client=client, max_retries=0)
        monkeypatch.setattr(DemoJobs, "api", lambda self, alias: sdk)
        jobs.submit()
        assert not jobs.problems, jobs.problems
        job = jobs.jobs["orders"]
        options = job.model_extra["lorafleet"]["options"]
        assert options["alias"] == "orders" and options["max_steps"] == 240 and options["dropout"] == 0.0
        assert options["schema"]["type"] == "object" and options["eval_every"] == 80
        assert job.validation_file and job.metadata == {"demo": "orders"}
        multiplier = job.method.supervised.hyperparameters.learning_rate_multiplier
        assert multiplier * recipe("base-model")["learning_rate"] == pytest.approx(1e-3)  # the config's rate
        again = DemoJobs(
            "http://testserver", keys, AdapterStore(settings.adapters_dir), ["orders"], base_model="base-model"
        )
        again.submit()
        assert again.jobs["orders"].id == job.id  # followed, not created twice
        assert len(list(sdk.fine_tuning.jobs.list())) == 1


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


def test_a_stopped_foreground_run_is_resumed_and_a_half_saved_one_is_not(tmp_path: Path) -> None:
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
