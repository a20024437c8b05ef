"""A fine-tuning job into an alias, after its executor gated the version: the alias's rollout policy bounds the
tenant's canary, each gateway starts the canary, copies its steps and verdict into the job, and promotes an alias's
first version at once. A fake engine; the gate and the trainings themselves run in tests/e2e/test_rollout_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from contract.store import AdapterStore
from serving.canary.analysis import CanaryConfig
from serving.config import GatewaySettings
from serving.state.jobs import JobStore
from serving.state.policies import CanaryChoice, RolloutPolicy
from serving.state.rollouts import rollout_values
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY
from tests.unit.test_fine_tuning import sdk, two_tenants, upload

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], GatewaySettings]]:
    yield from two_tenants(tmp_path)


def _state(api: openai.OpenAI, job_id: str) -> str:
    return api.fine_tuning.jobs.retrieve(job_id).model_extra["lorafleet"]["rollout"]["state"]  # type: ignore[index]


def _past(api: openai.OpenAI, job_id: str, state: str) -> Any:
    """The job once its rollout has left ``state``."""
    _until(lambda: _state(api, job_id), lambda now: now != state)
    return api.fine_tuning.jobs.retrieve(job_id)


def test_a_tenant_chooses_its_canary_only_within_the_aliass_rollout_policy() -> None:
    policy = RolloutPolicy(canary=CanaryConfig(steps=[10, 50, 100], interval_s=30, min_samples=20))
    assert policy.choose(None) == policy.canary
    chosen = policy.choose(CanaryChoice(steps=[5, 25, 50, 100], min_samples=40))
    assert (chosen.steps, chosen.interval_s, chosen.min_samples) == ([5, 25, 50, 100], 30, 40)
    for asked, field in [
        (CanaryChoice(steps=[20, 50, 100]), "steps"),  # more users on the first step than the admin allows
        (CanaryChoice(steps=[5, 100]), "steps"),  # a step skipped: promoted after one analysis
        (CanaryChoice(steps=[5]), "steps"),
        (CanaryChoice(steps=[10, 60, 100]), "steps"),
        (CanaryChoice(interval_s=10), "interval_s"),
        (CanaryChoice(min_samples=5), "min_samples"),
        (CanaryChoice(steps=[5, 3]), "steps"),  # not rising
    ]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            policy.choose(asked)


def test_the_rollout_policy_is_the_admins_and_a_jobs_choice_is_checked_against_it_when_created(gw) -> None:
    client, keys, _ = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    gateway.tenants.grant(gateway.tenants.get("acme"), "invoices")
    assert client.get("/admin/aliases/invoices/rollout", headers=ADMIN).json()["canary"]["steps"] == [5, 25, 50, 100]
    policy = {"canary": {"steps": [10, 100], "interval_s": 5, "min_samples": 10}, "gate": {"min_valid": 0.5}}
    put = client.put("/admin/aliases/invoices/rollout", headers=ADMIN, json=policy)
    assert put.status_code == 200 and put.json()["gate"] == {
        "min_valid": 0.5,
        "min_field_accuracy": 0.9,
        "max_drop": 0.02,
        "alpha": 0.05,
    }
    bad = client.put("/admin/aliases/invoices/rollout", headers=ADMIN, json={"gate": {"alpha": 2}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_field", bad.text
    assert "alpha" in bad.json()["error"]["param"]
    assert client.put("/admin/aliases/No%20Alias/rollout", headers=ADMIN, json={}).status_code == 400
    acme = sdk(client, keys["acme"])
    training = upload(acme)

    def create(**options: Any) -> Any:
        return acme.fine_tuning.jobs.create(
            model="base-model", training_file=training, extra_body={"lorafleet": options}
        )

    job = create(alias="invoices", rollout={"steps": [5, 50, 100], "min_samples": 12})
    assert job.model_extra["lorafleet"]["options"]["rollout"] == {"steps": [5, 50, 100], "min_samples": 12}
    for options, param in [
        ({"rollout": {"steps": [5, 100]}}, "lorafleet.rollout"),  # no alias: nothing to roll out into
        ({"alias": "invoices", "rollout": {"steps": [10]}}, "lorafleet.rollout.steps"),
        ({"alias": "invoices", "rollout": {"steps": [50, 100]}}, "lorafleet.rollout.steps"),
        ({"alias": "invoices", "rollout": {"interval_s": 1}}, "lorafleet.rollout.interval_s"),
        ({"alias": "invoices", "rollout": {"weight": 5}}, "lorafleet.rollout.weight"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            create(**options)
        assert refused.value.param == param, options
    # a tenant does not read or set the policy
    assert (
        client.get("/admin/aliases/invoices/rollout", headers={"Authorization": f"Bearer {keys['acme']}"}).status_code
        == 401
    )


def _gated(gateway: Any, tenant_id: int, alias: str, *, stable: bool, choice: dict | None = None) -> tuple[str, int]:
    """What the runner leaves behind for a job into ``alias`` whose gate passed: the version published with its
    verdict, the job succeeded with its rollout ``canary_pending``. ``stable``: the alias had a stable version."""
    settings = gateway.settings
    store = AdapterStore(settings.adapters_dir)
    made = settings.data_dir / f"made-{time.monotonic_ns()}"
    if stable and store.stable(alias) is None:
        first = store.publish(make_adapter(made / "v1"), alias)
        store.promote(alias, first.version, force=True, reason="test")
    stable_now = store.stable(alias)
    published = store.publish(make_adapter(made / "next"), alias)
    store.record_gate(published, {"passed": True, "target": published.ref, "checks": []})
    jobs: JobStore = gateway.jobs
    options = {"alias": alias} | ({"rollout": choice} if choice else {})
    job = jobs.create(
        tenant_id,
        None,
        model="base",
        base_model="base",
        training_file="file-x",
        seed=0,
        hyperparameters={},
        options=options,
    )
    claimed = jobs.claim("w", "validating_files", 60, "local")
    assert claimed is not None and jobs.release(job.id, str(claimed.worker), "queued", "validated")
    running = jobs.claim("w2", "queued", 60, "local")
    assert running is not None
    rollout = {
        "alias": alias,
        "version": published.version,
        "stable": stable_now.version if stable_now else None,
        "state": "canary_pending",
        "gate": {"passed": True, "against": stable_now.ref if stable_now else "base"},
        "canary": None,
        "reason": None,
    }
    with jobs.finishing(job.id, str(running.worker), "succeeded", fine_tuned_model=alias, **rollout_values(rollout)):
        pass
    return job.id, published.version


def _until(read: Any, done: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        assert time.monotonic() < deadline, f"still {value}"
        time.sleep(0.1)
    return value


def _events(api: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100).data][::-1]


def test_a_gated_version_runs_as_a_canary_and_its_steps_and_verdict_land_in_the_job(gw) -> None:
    client, keys, settings = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme = gateway.tenants.get("acme")
    gateway.tenants.grant(acme, "invoices")
    policy = {"canary": {"steps": [10, 50, 100], "interval_s": 3600, "min_samples": 5}}
    assert client.put("/admin/aliases/invoices/rollout", headers=ADMIN, json=policy).status_code == 200
    job_id, version = _gated(gateway, acme.id, "invoices", stable=True, choice={"steps": [10, 50, 100]})
    api = sdk(client, keys["acme"])
    job = _past(api, job_id, "canary_pending")
    canary = job.model_extra["lorafleet"]["rollout"]["canary"]
    assert (canary["state"], canary["step"], canary["steps"], canary["weight"]) == ("running", 1, [10, 50, 100], 0.1)
    status = client.get("/admin/canaries/invoices", headers=ADMIN).json()
    assert (status["candidate"], status["config"]["min_samples"]) == (version, 5)  # the policy's, where not chosen
    assert any(m.startswith(f"Canary started: invoices@{version} takes 10%") for m in _events(api, job_id))
    promoted = client.post("/admin/canaries/invoices/promote", headers=ADMIN, json={"reason": "looks good"})
    assert promoted.status_code == 200
    job = _past(api, job_id, "canary")
    rollout = job.model_extra["lorafleet"]["rollout"]
    assert (rollout["state"], rollout["reason"], rollout["canary"]["state"]) == ("promoted", "looks good", "promoted")
    events = _events(api, job_id)
    assert "Canary promote: looks good" in events
    assert events[-1] == f"Rollout ended: invoices@{version} promoted; it now serves invoices."
    assert AdapterStore(settings.adapters_dir).stable("invoices").version == version  # type: ignore[union-attr]
    time.sleep(1.5)  # an ended rollout is not followed again: nothing more is written
    assert _events(api, job_id) == events


def test_a_rolled_back_canary_ends_the_rollout_with_a_warning(gw) -> None:
    client, keys, _ = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme = gateway.tenants.get("acme")
    gateway.tenants.grant(acme, "invoices")
    job_id, _ = _gated(gateway, acme.id, "invoices", stable=True)
    api = sdk(client, keys["acme"])
    _until(lambda: client.get("/admin/canaries/invoices", headers=ADMIN).status_code, lambda s: s == 200)
    client.post("/admin/canaries/invoices/rollback", headers=ADMIN, json={"reason": "validity fell"})
    job = _past(api, job_id, "canary")
    assert job.model_extra["lorafleet"]["rollout"]["state"] == "rolled_back"
    last = api.fine_tuning.jobs.list_events(job_id, limit=1).data[0]
    assert last.level == "warn" and "rolled back (validity fell); invoices@1 keeps serving invoices" in last.message


def test_an_aliass_first_version_is_promoted_once_gated_and_a_moved_stable_stops_a_rollout(gw) -> None:
    client, keys, settings = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    acme = gateway.tenants.get("acme")
    gateway.tenants.grant(acme, "invoices")
    api = sdk(client, keys["acme"])
    first, version = _gated(gateway, acme.id, "invoices", stable=False)
    job = _past(api, first, "canary_pending")
    assert job.model_extra["lorafleet"]["rollout"]["state"] == "promoted"
    store = AdapterStore(settings.adapters_dir)
    assert store.stable("invoices").version == version  # type: ignore[union-attr]
    # the next job's gate compared with v1; another version is promoted before its canary starts
    follower, gateway.rollouts = gateway.rollouts, None  # (held still meanwhile)
    second, _ = _gated(gateway, acme.id, "invoices", stable=True)
    other = store.publish(make_adapter(settings.data_dir / "other"), "invoices")
    store.promote("invoices", other.version, force=True, reason="by hand")
    gateway.rollouts = follower
    job = _past(api, second, "canary_pending")
    rollout = job.model_extra["lorafleet"]["rollout"]
    assert rollout["state"] == "not_started"
    assert (
        rollout["reason"] == f"the alias's stable version changed since the gate (invoices@{version}; now {other.ref})"
    )
    assert client.get("/admin/canaries/invoices", headers=ADMIN).status_code == 404  # no canary was started


def test_an_alias_serving_its_newest_version_is_made_stable_before_a_job_gates_against_it(tmp_path: Path) -> None:
    """Versions published before rollouts (or by hand) serve as the newest with no stable one: a job into such an
    alias gates and canaries against that version, made stable first (not against the base model, and never
    letting its own version serve by being newer)."""
    from finetune.runner import Runner
    from finetune.settings import WorkerSettings
    from serving.state.tenants import TenantStore

    settings = WorkerSettings(data_dir=tmp_path)
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    store = AdapterStore(settings.data_dir / "adapters")
    serving = store.publish(make_adapter(tmp_path / "old"), "invoices")
    jobs = JobStore(tenants.engine)
    spec = {"model": "m", "base_model": "m", "training_file": "file-x", "seed": 0, "hyperparameters": {}}
    job = jobs.create(acme.id, None, **spec, options={"alias": "invoices"})
    runner = Runner(settings, job.id, "w")
    baseline = runner._baseline(AdapterStore(settings.data_dir / "adapters"), "invoices")
    assert baseline is not None and baseline.version == serving.version
    assert store.stable("invoices").version == serving.version  # type: ignore[union-attr]
    assert "is now stable" in jobs.events(None, job.id, None, 10)[0][0]["message"]
    assert runner._baseline(store, "nothing-yet") is None  # a fresh alias: gated against the base model
