"""OpenAI's fine-tuning jobs API through the official openai client, and the jobs' life in the state database:
shapes field for field, per-tenant scoping, every refusal, the queue's fairness and leases, the worker's
validation step. No model here: the trainings themselves run in tests/e2e/test_fine_tuning_e2e.py."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from contract.store import ALIAS_RE, AdapterStore
from finetune.recipes import resolve, train_settings
from finetune.settings import WorkerSettings
from finetune.worker import Worker
from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.files import RESULTS
from serving.state.jobs import JobStateError, JobStore, fine_tuned_name
from serving.state.tenants import Limits, TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, fake_base

GOOD = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Say {i} as JSON"},
                {"role": "assistant", "content": f'{{"n": {i}}}'},
            ]
        }
    )
    + "\n"
    for i in range(12)
).encode()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], GatewaySettings]]:
    yield from two_tenants(tmp_path)


def two_tenants(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], GatewaySettings]]:
    """A gateway on a fake engine with tenants acme and other (and their keys)."""
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    tenants = TenantStore(settings.state_url)
    keys = {}
    for name in ("acme", "other"):
        tenant = tenants.enroll(name, limits=Limits(running_jobs=1, queued_jobs=3))[0]
        keys[name] = tenants.issue_key(tenant)
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        yield client, keys, settings


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def upload(api: openai.OpenAI, content: bytes = GOOD) -> str:
    return api.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def test_a_job_is_created_listed_and_read_back_in_openais_shape(gw) -> None:
    client, keys, settings = gw
    acme = sdk(client, keys["acme"])
    training, validation = upload(acme), upload(acme)
    job = acme.fine_tuning.jobs.create(
        model="base-model",
        training_file=training,
        validation_file=validation,
        suffix="Orders_v2",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": "auto"}}},
        metadata={"team": "checkout"},
        extra_body={"lorafleet": {"rank": 8, "max_steps": 20}},
    )
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert (job.status, job.model, job.training_file, job.validation_file, job.seed) == (
        "validating_files",
        "base-model",
        training,
        validation,
        7,
    )
    assert (job.fine_tuned_model, job.finished_at, job.trained_tokens, job.result_files) == (None, None, None, [])
    assert job.organization_id == "acme" and job.metadata == {"team": "checkout"}
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == 3
    assert job.hyperparameters.batch_size == "auto" and job.hyperparameters.learning_rate_multiplier == "auto"
    extra = job.model_extra["lorafleet"]
    assert extra["options"] == {"rank": 8, "max_steps": 20} and extra["base_model"] == settings.base_model
    assert acme.fine_tuning.jobs.retrieve(job.id) == job
    assert [j.id for j in acme.fine_tuning.jobs.list()] == [job.id]
    assert [e.message for e in acme.fine_tuning.jobs.list_events(job.id)] == ["Validating training file."]
    assert acme.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_jobs_page_by_cursor_and_filter_by_metadata(gw) -> None:
    client, keys, _ = gw
    acme = sdk(client, keys["acme"])
    training = upload(acme)
    made = [
        acme.fine_tuning.jobs.create(model="base-model", training_file=training, metadata={"n": str(i)}).id
        for i in range(3)
    ]
    page = acme.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[::-1][:2] and page.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(limit=2, after=made[1]).data] == [made[0]]
    assert [j.id for j in acme.fine_tuning.jobs.list(limit=1)] == made[::-1]  # the SDK pages on
    assert [j.id for j in acme.fine_tuning.jobs.list(metadata={"n": "1"})] == [made[1]]
    assert list(acme.fine_tuning.jobs.list(metadata={"n": "9"})) == []


def test_another_tenants_job_and_file_are_404s_like_missing_ones(gw) -> None:
    client, keys, _ = gw
    acme, other = sdk(client, keys["acme"]), sdk(client, keys["other"])
    training = upload(acme)
    job = acme.fine_tuning.jobs.create(model="base-model", training_file=training)
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.fine_tuning.jobs.cancel(job.id),
        lambda: other.fine_tuning.jobs.list_events(job.id),
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: other.fine_tuning.jobs.retrieve("ftjob-missing"),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.code == "job_not_found"
    assert list(other.fine_tuning.jobs.list()) == []
    with pytest.raises(openai.NotFoundError) as theirs:
        other.fine_tuning.jobs.create(model="base-model", training_file=training)
    assert (theirs.value.code, theirs.value.param) == ("file_not_found", "training_file")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "no spaces please"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 10_000}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"method": {"type": "dpo"}}, "method.type"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
            },
            "hyperparameters",
        ),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
        ({"extra_body": {"lorafleet": {"rank": 64}}}, "lorafleet.rank"),
        ({"extra_body": {"lorafleet": {"save_every": 5, "eval_every": 2}}}, "lorafleet.save_every"),
        ({"extra_body": {"lorafleet": {"dropuot": 0.1}}}, "lorafleet.dropuot"),
        ({"extra_body": {"epochs": 3}}, "epochs"),
    ],
)
def test_bad_job_fields_are_400s_naming_the_field(gw, fields: dict[str, Any], param: str) -> None:
    client, keys, _ = gw
    acme = sdk(client, keys["acme"])
    with pytest.raises(openai.BadRequestError) as refused:
        acme.fine_tuning.jobs.create(model="base-model", training_file=upload(acme), **fields)
    assert (refused.value.code, refused.value.param) == ("invalid_job", param), refused.value.message
    assert list(acme.fine_tuning.jobs.list()) == []


def test_an_unknown_model_or_a_results_file_is_refused(gw) -> None:
    client, keys, _ = gw
    acme = sdk(client, keys["acme"])
    with pytest.raises(openai.NotFoundError) as unknown:
        acme.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload(acme))
    assert unknown.value.param == "model" and "base-model" in unknown.value.message
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    results = gateway.files.add(
        gateway.tenants.get("acme").id, "r.csv", RESULTS, io.BytesIO(b"step\n1\n"), made_here=True
    )
    with pytest.raises(openai.BadRequestError) as wrong:
        acme.fine_tuning.jobs.create(model="base-model", training_file=results.id)
    assert wrong.value.param == "training_file" and "fine-tune-results" in wrong.value.message


def test_a_tenants_waiting_jobs_are_capped_with_a_429_the_sdk_does_not_retry(gw) -> None:
    client, keys, _ = gw
    acme = openai.OpenAI(base_url="http://testserver/v1", api_key=keys["acme"], http_client=client, max_retries=2)
    training = upload(acme)
    for _ in range(3):
        acme.fine_tuning.jobs.create(model="base-model", training_file=training)
    with pytest.raises(openai.RateLimitError) as capped:
        acme.fine_tuning.jobs.create(model="base-model", training_file=training)
    assert capped.value.code == "job_quota_exceeded" and "limit is 3" in capped.value.message
    assert len(list(acme.fine_tuning.jobs.list())) == 3
    cancelled = acme.fine_tuning.jobs.cancel(next(iter(acme.fine_tuning.jobs.list())).id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    acme.fine_tuning.jobs.create(model="base-model", training_file=training)  # a place came free


def test_cancel_pause_resume_follow_the_jobs_status(gw) -> None:
    client, keys, _ = gw
    acme = sdk(client, keys["acme"])
    job = acme.fine_tuning.jobs.create(model="base-model", training_file=upload(acme))
    with pytest.raises(openai.BadRequestError) as not_paused:
        acme.fine_tuning.jobs.resume(job.id)
    assert not_paused.value.code == "job_state"
    jobs: JobStore = client.app.state.gateway.jobs  # type: ignore[attr-defined]
    claimed = jobs.claim("w1", "validating_files", 60, "local")
    assert claimed is not None and jobs.release(job.id, str(claimed.worker), "queued", "validated")
    assert acme.fine_tuning.jobs.pause(job.id).status == "paused"
    assert acme.fine_tuning.jobs.resume(job.id).status == "queued"
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as again:
        acme.fine_tuning.jobs.cancel(job.id)
    assert again.value.code == "job_state" and "already cancelled" in again.value.message
    messages = [e.message for e in acme.fine_tuning.jobs.list_events(job.id)]
    assert messages[0] == "Job cancelled." and messages[-1] == "Validating training file."
    first = acme.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more
    rest = acme.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id)
    assert [e.id for e in first.data] + [e.id for e in rest.data] == [
        e.id for e in acme.fine_tuning.jobs.list_events(job.id, limit=100).data
    ]


def test_a_running_job_pauses_through_its_worker_and_a_cancel_takes_it_from_the_worker(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)
    job = _queued(jobs, tenant)
    running = jobs.claim("w1", "queued", 60, "local")
    assert running is not None and running.status == "running" and running.attempts == 0
    paused = jobs.pause(None, job.id)
    assert (paused.status, paused.desired) == ("running", "pause")  # the worker stops it after its step
    assert jobs.release(job.id, str(running.worker), "paused", "stopped at step 3")
    assert jobs.get(None, job.id).status == "paused"
    jobs.resume(None, job.id)
    again = jobs.claim("w2", "queued", 60, "local")
    assert again is not None and again.attempts == 0  # a pause is no lost worker
    jobs.cancel(None, job.id)
    assert jobs.heartbeat(job.id, str(again.worker), 60) is None  # the worker's next heartbeat tells it to stop
    with pytest.raises(JobStateError), jobs.finishing(job.id, str(again.worker), "succeeded", fine_tuned_model="x"):
        pytest.fail("a cancelled job must not finish")
    assert jobs.get(None, job.id).fine_tuned_model is None


def test_a_job_whose_worker_died_is_queued_again_and_taken_by_another(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)
    job = _queued(jobs, tenant)
    dead = jobs.claim("dead", "queued", 0.01, "local")
    assert dead is not None
    time.sleep(0.05)
    assert jobs.expired() == [job.id]
    taken = jobs.claim("alive", "queued", 60, "local")
    assert taken is not None and taken.worker.startswith("alive#") and taken.attempts == 1  # one worker lost
    assert jobs.heartbeat(job.id, str(dead.worker), 60) is None  # the old worker, if it wakes up, has lost it
    assert "stopped answering" in jobs.events(None, job.id, None, 10)[0][1]["message"]


def test_the_queue_takes_every_tenants_first_job_before_anyones_second(tmp_path: Path) -> None:
    """Three tenants submit two jobs each at once (a's first): one worker takes a1, b1, c1, then a2, b2, c2."""
    jobs, _ = _store(tmp_path)
    store = TenantStore(f"sqlite:///{tmp_path / 'state.db'}")
    ids = {}
    for name in ("a", "b", "c"):
        tenant = store.enroll(name, limits=Limits(running_jobs=None, queued_jobs=None))[0]
        ids[name] = tenant.id
    made = {}
    for n in (1, 2):
        for name in ("a", "b", "c"):
            made[_queued(jobs, ids[name]).id] = f"{name}{n}"
    order = []
    for _ in range(6):
        job = jobs.claim("w", "queued", 60, "local")
        assert job is not None
        order.append(made[job.id])
        with jobs.finishing(job.id, str(job.worker), "succeeded"):
            pass
    assert order == ["a1", "b1", "c1", "a2", "b2", "c2"]


def test_a_tenants_running_jobs_stay_within_its_limit(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)  # running_jobs=1
    first, _ = _queued(jobs, tenant), _queued(jobs, tenant)
    assert jobs.claim("w1", "queued", 60, "local").id == first.id  # type: ignore[union-attr]
    assert jobs.claim("w2", "queued", 60, "local") is None  # the second waits for the first to end


def test_the_worker_fails_a_bad_file_naming_its_lines_and_queues_a_good_one(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)
    settings = WorkerSettings(data_dir=tmp_path)
    worker = Worker(settings, executor=_NoExecutor(), name="w")
    bad = GOOD + b'{"messages": [{"role": "user", "content": "x"}]}\n{oops\n'
    bad_file = worker.files.add(tenant, "bad.jsonl", "fine-tune", io.BytesIO(bad))
    good_file = worker.files.add(tenant, "good.jsonl", "fine-tune", io.BytesIO(GOOD))
    failing = jobs.create(tenant, None, **_spec(bad_file.id))
    passing = jobs.create(tenant, None, **_spec(good_file.id))
    worker.round()
    worker.round()
    failed = jobs.get(None, failing.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["param"] == "training_file" and failed.error["code"] == "invalid_file"
    assert "line 13" in failed.error["message"] and "line 14" in failed.error["message"]
    assert str(tmp_path) not in failed.error["message"]  # the file is named by its id, not the server's path
    assert jobs.get(None, passing.id).status == "running"  # validated, queued, then taken by the worker
    assert worker.executor.started == [passing.id]  # type: ignore[attr-defined]


def test_a_training_that_dies_without_a_word_fails_its_job_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jobs, tenant = _store(tmp_path)
    job = _queued(jobs, tenant)
    worker = Worker(WorkerSettings(data_dir=tmp_path), executor=_NoExecutor(exit_code=-9), name="w")
    worker.round()
    worker.running[job.id].join(10)
    failed = jobs.get(None, job.id)
    assert failed.status == "failed" and failed.error["code"] == "training_died"  # type: ignore[index]
    assert "status -9" in failed.error["message"] and job.id in failed.error["message"]  # type: ignore[index]
    assert "Killed" not in failed.error["message"]  # type: ignore[index]  # the log's lines are the operator's
    assert "Killed" in caplog.text


def test_fine_tuned_models_are_listed_as_the_tenants_and_deleted_by_it_alone(gw) -> None:
    client, keys, settings = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme_id = gateway.tenants.get("acme").id
    job = gateway.jobs.create(acme_id, None, **_spec("file-x", base=settings.base_model))
    name = fine_tuned_name(settings.base_model, "demo", job.id)
    assert gateway.jobs.claim("w", "queued", 60, "local") is None  # still validating
    validating = gateway.jobs.claim("w", "validating_files", 60, "local")
    gateway.jobs.release(job.id, validating.worker, "queued", "ok")
    running = gateway.jobs.claim("w", "queued", 60, "local")
    AdapterStore(settings.adapters_dir).publish(make_adapter(settings.data_dir / "made"), name)
    acme, other = sdk(client, keys["acme"]), sdk(client, keys["other"])
    assert name not in {m.id for m in acme.models.list()}  # the tenant is in the gateway's cache now
    with gateway.jobs.finishing(job.id, running.worker, "succeeded", fine_tuned_model=name) as db:
        from serving.state.tenants import grant_in

        grant_in(db, acme_id, name)  # as a worker does: in the database, no cache of this gateway cleared
    # The first request for the new model answers (not 404 until the cache expires): a grant the cache does not
    # know is looked up once.
    answer = acme.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert answer.model.startswith(name)
    mine = {m.id: m for m in acme.models.list()}
    assert mine[name].owned_by == "acme" and mine[name].created > 0
    assert name not in {m.id for m in other.models.list()}
    with pytest.raises(openai.NotFoundError):
        other.models.delete(name)
    deleted = acme.models.delete(name)
    assert (deleted.id, deleted.deleted) == (name, True)
    gateway.tenants.changed()
    assert name not in {m.id for m in acme.models.list()}
    assert AdapterStore(settings.adapters_dir).serving(name) is None  # retired: it leaves the engines


def test_a_fine_tuned_models_name_is_an_alias_that_says_where_it_came_from() -> None:
    job_id = "ftjob-18ee91e5bb00a2af4c6fc6cd"
    assert fine_tuned_name("/models/SmolLM2-135M-Instruct", "Orders_v2", job_id) == (
        "ft-smollm2-135m-instruct-orders-v2-4c6fc6cd"
    )
    longest = fine_tuned_name("x" * 200, "y" * 64, job_id)
    assert ALIAS_RE.match(longest) and len(longest) <= 63
    assert fine_tuned_name("gemma-3-270m", None, job_id) == "ft-gemma-3-270m-4c6fc6cd"


def test_auto_hyperparameters_come_from_the_base_models_recipe() -> None:
    small = resolve(
        {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        "SmolLM2-135M-Instruct",
        examples=100,
    )
    assert small == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 10}  # capped at max_epochs
    assert resolve({}, "SmolLM2-135M-Instruct", examples=1000)["n_epochs"] == 2  # 1920 examples seen
    fields = train_settings(
        resolve({"learning_rate_multiplier": 0.5}, "SmolLM2-135M-Instruct", 1000), {"rank": 4}, "SmolLM2-135M-Instruct"
    )
    assert fields["learning_rate"] == pytest.approx(5e-4) and fields["rank"] == 4 and fields["epochs"] == 2.0
    assert train_settings(resolve({}, "unknown-model", 10), {}, "unknown-model")["learning_rate"] == 2e-4


# -- helpers ---------------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, code: int | None) -> None:
        self.code, self.ref = code, "fake"

    def exit_code(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.code = -9

    def interrupt(self) -> None:
        pass

    def log_tail(self) -> str:
        return "loading\nKilled\n"


class _NoExecutor:
    """Starts nothing: records what it was asked to start; its runs end with ``exit_code`` (None: never)."""

    kind = "local"

    def __init__(self, exit_code: int | None = None) -> None:
        self.started: list[str] = []
        self.exit_code = exit_code

    def start(self, job: Any, worker: str) -> _Run:
        self.started.append(job.id)
        return _Run(self.exit_code)

    def forget(self, job: Any) -> None:
        pass


def _store(tmp_path: Path) -> tuple[JobStore, int]:
    tenants = TenantStore(f"sqlite:///{tmp_path / 'state.db'}")
    tenant = tenants.enroll("acme", limits=Limits(running_jobs=1, queued_jobs=10))[0]
    return JobStore(tenants.engine), tenant.id


def _spec(file_id: str, base: str = "base") -> dict[str, Any]:
    return {
        "model": "base",
        "base_model": base,
        "training_file": file_id,
        "seed": 0,
        "hyperparameters": {},
        "options": {},
    }


def _queued(jobs: JobStore, tenant: int) -> Any:
    job = jobs.create(tenant, None, **_spec("file-x"))
    claimed = jobs.claim("validator", "validating_files", 60, "local")
    assert claimed is not None and jobs.release(job.id, str(claimed.worker), "queued", "validated")
    return job


def test_operators_see_and_cancel_every_tenants_jobs_with_the_admin_key(gw) -> None:
    client, keys, _ = gw
    made = {
        name: sdk(client, keys[name])
        .fine_tuning.jobs.create(model="base-model", training_file=upload(sdk(client, keys[name])))
        .id
        for name in ("acme", "other")
    }
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listed = client.get("/admin/fine_tuning/jobs", headers=admin).json()["data"]
    assert {j["id"]: j["organization_id"] for j in listed} == {made["acme"]: "acme", made["other"]: "other"}
    only = client.get("/admin/fine_tuning/jobs", params={"tenant": "other"}, headers=admin).json()["data"]
    assert [j["id"] for j in only] == [made["other"]]
    assert client.get(f"/admin/fine_tuning/jobs/{made['acme']}/events", headers=admin).json()["data"]
    cancelled = client.post(f"/admin/fine_tuning/jobs/{made['other']}/cancel", json={}, headers=admin).json()
    assert cancelled["status"] == "cancelled"
    tenant_key = {"Authorization": f"Bearer {keys['acme']}"}
    assert client.get("/admin/fine_tuning/jobs", headers=tenant_key).status_code == 401
    JobStore(client.app.state.gateway.tenants.engine).beat("w-1", "local", None)  # type: ignore[attr-defined]
    assert [w["name"] for w in client.get("/admin/fine_tuning/workers", headers=admin).json()["data"]] == ["w-1"]


def test_a_job_publishes_into_an_alias_only_when_it_is_the_tenants_alone(gw) -> None:
    client, keys, _ = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme, other = gateway.tenants.get("acme"), gateway.tenants.get("other")
    gateway.tenants.grant(acme, "invoices")
    gateway.tenants.grant(acme, "shared")
    gateway.tenants.grant(other, "shared")
    api = sdk(client, keys["acme"])
    training = upload(api)

    def create(**options: Any) -> Any:
        return api.fine_tuning.jobs.create(
            model="base-model", training_file=training, extra_body={"lorafleet": options}
        )

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    job = create(alias="invoices", schema=schema)
    assert job.model_extra["lorafleet"]["options"] == {"alias": "invoices", "schema": schema}
    for alias in ("shared", "unknown", "base", "Not An Alias"):
        with pytest.raises(openai.BadRequestError) as refused:
            create(alias=alias)
        assert refused.value.param == "lorafleet.alias", alias
    with pytest.raises(openai.BadRequestError) as bad_schema:
        create(schema={"type": "object", "properties": {"n": {"type": 12}}})
    assert "schema" in (bad_schema.value.param or "")


def test_a_worker_never_takes_a_file_check_another_holds_and_a_poison_file_fails_only_its_job(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)
    worker = Worker(WorkerSettings(data_dir=tmp_path), executor=_NoExecutor(), name="w")
    deep = ("[" * 100_000 + "]" * 100_000 + "\n").encode()
    poison = jobs.create(
        tenant, None, **_spec(worker.files.add(tenant, "deep.jsonl", "fine-tune", io.BytesIO(deep)).id)
    )
    good = jobs.create(tenant, None, **_spec(worker.files.add(tenant, "ok.jsonl", "fine-tune", io.BytesIO(GOOD)).id))
    held = jobs.claim("other-worker", "validating_files", 60, "local")
    assert held is not None and held.id == poison.id
    assert jobs.claim("w", "validating_files", 60, "local").id == good.id  # type: ignore[union-attr]
    jobs.release(good.id, "nobody", "queued", "")  # (not w's to release: nothing happens)
    assert jobs.get(None, good.id).status == "validating_files"
    time.sleep(0.01)
    with jobs.engine.begin() as db:  # the other worker's lease runs out
        from serving.state.tables import jobs_table

        db.execute(jobs_table.update().where(jobs_table.c.id == poison.id).values(lease_until=0))
    worker.round()
    failed = jobs.get(None, poison.id)
    assert failed.status == "failed" and failed.error["param"] == "training_file"  # type: ignore[index]
    assert "nested too deeply" in failed.error["message"]  # type: ignore[index]


def test_the_sweep_cleans_only_ended_jobs_folders_and_keeps_their_training_logs(tmp_path: Path) -> None:
    jobs, tenant = _store(tmp_path)
    worker = Worker(WorkerSettings(data_dir=tmp_path), executor=_NoExecutor(), name="w")
    ended, running = _queued(jobs, tenant), _queued(jobs, tenant)
    jobs.cancel(None, ended.id)
    root = tmp_path / "jobs"
    for name in (ended.id, running.id, "lost+found"):
        (root / name / "adapter.partial" / "checkpoints").mkdir(parents=True)
        (root / name / "train.log").write_text("step 1\n")
    worker.sweep()
    assert sorted(p.name for p in (root / ended.id).iterdir()) == ["train.log"]  # what operators read
    assert (root / running.id / "adapter.partial").is_dir()  # a job that has not ended keeps its checkpoints
    assert (root / "lost+found" / "adapter.partial").is_dir()  # not a job's folder: never touched


def test_an_alias_published_by_a_worker_answers_at_once_not_after_the_gateways_cache(gw) -> None:
    client, keys, settings = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    gateway.tenants.grant(gateway.tenants.get("acme"), "invoices")
    api = sdk(client, keys["acme"])
    with pytest.raises(openai.NotFoundError):  # nothing published yet (and the gateway remembers that)
        api.chat.completions.create(model="invoices", messages=[{"role": "user", "content": "hi"}])
    AdapterStore(settings.adapters_dir).publish(make_adapter(settings.data_dir / "made"), "invoices")  # a worker
    answer = api.chat.completions.create(model="invoices", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "invoices@1"
