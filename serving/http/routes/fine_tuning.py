"""OpenAI's fine-tuning jobs API, scoped by the tenant key: a job trains on a tenant's file and ends in a model
that tenant can call.

POST /v1/fine_tuning/jobs                       create (``model``, ``training_file``, ``validation_file``,
                                                ``suffix``, ``seed``, ``method``, ``hyperparameters``,
                                                ``metadata``, and this service's ``lorafleet`` object)
GET  /v1/fine_tuning/jobs                       ``after``, ``limit``, ``metadata[k]=v``
GET  /v1/fine_tuning/jobs/{id}                  the job
POST /v1/fine_tuning/jobs/{id}/cancel|pause|resume
GET  /v1/fine_tuning/jobs/{id}/events           ``after``, ``limit``; newest first
GET  /v1/fine_tuning/jobs/{id}/checkpoints      ``after``, ``limit``; newest first, with their metrics

The gateway only writes and reads the job's row (``serving.state.jobs``): a
worker (``lorafleet worker``, package ``finetune``) validates, trains and
publishes. Another tenant's job is a 404 exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.manifest import read_manifest
from contract.store import StoreError, check_alias
from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.http.deps import StateDep, TenantDep
from serving.http.protocol import cursor_page
from serving.outputs.schemas import check_client_schema
from serving.plan import BASE_ALIAS
from serving.state.files import FileError
from serving.state.jobs import JobError, JobLimitReached, JobNotFound, JobStateError
from serving.state.policies import CanaryChoice
from serving.state.tenants import Tenant

router = APIRouter(prefix="/v1/fine_tuning/jobs")

SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50, strict=True)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256, strict=True)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]  # DPO and reinforcement are not trained here (refused with the reason)
    supervised: Supervised | None = None


class LorafleetOptions(BaseModel):
    """This service's settings beyond OpenAI's (the SDK's ``extra_body={"lorafleet": {...}}``); what is left out
    comes from the base model's recipe (``finetune/recipes``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    rank: int | None = Field(default=None, ge=1, le=256, description="LoRA rank r (at most the engines' max).")
    alpha: int | None = Field(default=None, ge=1, le=1024, description="LoRA alpha.")
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0, description="Dropout on LoRA's input.")
    targets: str | None = Field(
        default=None, max_length=256, description="attention, attention-mlp, or module names joined by commas."
    )
    max_steps: int | None = Field(default=None, ge=1, le=100_000, description="Stop after this many steps.")
    max_length: int | None = Field(default=None, ge=16, le=32_768, description="Longest example, in tokens.")
    eval_every: int | None = Field(default=None, ge=1, le=100_000, description="Validation loss every N steps.")
    save_every: int | None = Field(default=None, ge=1, le=100_000, description="A checkpoint every N steps.")
    log_every: int | None = Field(default=None, ge=1, le=10_000, description="A metrics event every N steps.")
    val_fraction: float | None = Field(
        default=None, ge=0.0, lt=0.9, description="Without a validation file: the share held out (default 0.1)."
    )
    alias: str | None = Field(
        default=None,
        max_length=63,
        description="Publish as the next version of this alias (granted to you alone) instead of a new model; the "
        "version is gated, canaried and promoted or rolled back on its own (docs/rollout.md).",
    )
    rollout: CanaryChoice | None = Field(
        default=None,
        description="With alias: the canary's steps, interval_s and min_samples, within the alias's rollout policy.",
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description="A JSON Schema every answer must match: checked when the files are, and the model's default "
        "schema when it serves (JSON enforced or validated per the alias's policy).",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method; still accepted
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lorafleet: LorafleetOptions = Field(default_factory=LorafleetOptions)


def _invalid(message: str, param: str | None) -> APIError:
    return APIError(ErrorCode.INVALID_JOB, message, param=param)


def _parse(raw: bytes) -> JobCreate:
    try:
        return JobCreate.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "literal["))) or None
        kind = first["type"]
        if kind == "json_invalid":
            raise APIError(ErrorCode.INVALID_JSON, "The body is not valid JSON.") from exc
        if kind == "extra_forbidden":
            hint = " (this service's own settings go in the 'lorafleet' object)" if "." not in (param or "") else ""
            raise _invalid(f"Unknown field {param!r}{hint}.", param) from exc
        if param == "method.type":
            message = "method.type: only 'supervised' fine-tuning runs here (not dpo or reinforcement)."
            raise _invalid(message, param) from exc
        raise _invalid(f"{param}: {first['msg']}.", param) from exc


def _checked(body: JobCreate) -> dict[str, Any]:
    """The rules no field type says: the suffix's characters, metadata's size, one way of giving hyperparameters."""
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise _invalid(
            f"suffix {body.suffix!r}: use 1-64 letters, digits, '-' or '_' (it becomes part of the model's name).",
            "suffix",
        )
    if body.metadata is not None:
        if len(body.metadata) > 16:
            raise _invalid(f"metadata has {len(body.metadata)} pairs; at most 16.", "metadata")
        for key, value in body.metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise _invalid(f"metadata[{key[:64]!r}]: keys up to 64 characters, values up to 512.", "metadata")
    if body.integrations:
        raise _invalid("integrations are not supported here (metrics are the job's events).", "integrations")
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if from_method is not None and body.hyperparameters is not None and from_method != body.hyperparameters:
        raise _invalid(
            "hyperparameters and method.supervised.hyperparameters disagree; give only method (hyperparameters is "
            "deprecated).",
            "hyperparameters",
        )
    chosen = from_method or body.hyperparameters or Hyperparameters()
    return chosen.model_dump()


def _base_of(state: Gateway, tenant: Tenant, name: str, alias: str | None) -> tuple[str, str | None]:
    """The provisioned base ``name`` is, or the base of the tenant's own fine-tuned model ``name`` (which the job
    continues from), or, when ``name`` is the alias the job publishes into, the base that alias's version serves
    on (trained afresh): ``(base model name, parent model or None)``."""
    if alias is not None and name == alias:
        return _base_of_alias(state, alias), None
    owned = state.jobs.owned_model(tenant.id, name)
    if owned is not None and name in tenant.aliases:
        return owned.base_model, name
    base = _provisioned(state, name)
    if base is not None:
        return base, None
    served = sorted({state.settings.base_model, *(b.record.name for b in state.adapters.served_bases())})
    raise APIError(
        ErrorCode.MODEL_NOT_FOUND,
        f"The model {name!r} is not a base model provisioned here, nor a fine-tuned model of yours. Fine-tune one "
        f"of: {', '.join(served)}.",
        param="model",
    )


def _provisioned(state: Gateway, name: str) -> str | None:
    """The base model ``name`` names here: the gateway's own (configured as a directory), or one provisioned under
    the models folder; ``None`` if neither."""
    configured = state.settings.base_model
    if name in (configured, Path(configured).name) and state.settings.model_path(configured) == configured:
        return configured  # the gateway's own base, configured as a directory
    provisioned = state.settings.models_dir / name
    if "/" not in name and name not in (".", "..") and (provisioned / "config.json").is_file():
        return name
    return None


def _base_of_alias(state: Gateway, alias: str) -> str:
    """The base model the alias's serving version was trained on, if provisioned here; else the gateway's own."""
    version = state.adapters.store.serving(alias)
    if version is None:
        return state.settings.base_model
    return _provisioned(state, read_manifest(version.path).base_model.name) or state.settings.base_model


def _file(state: Gateway, tenant: Tenant, file_id: str, param: str) -> None:
    try:
        record = state.files.get(tenant.id, file_id)
    except FileError as exc:
        raise APIError(ErrorCode.FILE_NOT_FOUND, f"{param}: no such file {file_id!r}.", param=param) from exc
    if record.purpose != "fine-tune":
        raise _invalid(f"{param}: {file_id} was uploaded for {record.purpose!r}, not 'fine-tune'.", param)


def _target(state: Gateway, tenant: Tenant, alias: str) -> None:
    """An alias a job may publish into: valid, granted to this tenant, and to no other (a shared alias's versions
    are not one tenant's to make)."""
    try:
        check_alias(alias)
    except StoreError as exc:
        raise _invalid(f"lorafleet.alias: {exc}.", "lorafleet.alias") from exc
    if alias == BASE_ALIAS or alias not in tenant.aliases:
        raise _invalid(f"lorafleet.alias: {alias!r} is not an alias granted to you.", "lorafleet.alias")
    others = [name for name in state.tenants.holders(alias) if name != tenant.name]
    if others:
        raise _invalid(
            f"lorafleet.alias: {alias!r} is granted to other tenants too; a job publishes only into an alias that "
            "is yours alone (leave lorafleet.alias out for a model of your own).",
            "lorafleet.alias",
        )


def _rollout(state: Gateway, alias: str | None, asked: CanaryChoice | None) -> None:
    """A canary asked for is for a job into an alias, and within that alias's rollout policy."""
    if alias is None:
        raise _invalid("lorafleet.rollout is for a job into an alias: give lorafleet.alias too.", "lorafleet.rollout")
    try:
        state.policies.rollout(alias).choose(asked)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        raise _invalid(f"lorafleet.rollout.{exc}.", f"lorafleet.rollout.{field}") from exc


def _create(state: Gateway, tenant: Tenant, body: JobCreate) -> dict[str, Any]:
    hyperparameters = _checked(body)
    options = body.lorafleet.model_dump(exclude_none=True, by_alias=True)
    if "alias" in options:
        _target(state, tenant, options["alias"])
    base, parent = _base_of(state, tenant, body.model, options.get("alias"))
    _file(state, tenant, body.training_file, "training_file")
    if body.validation_file is not None:
        _file(state, tenant, body.validation_file, "validation_file")
    if "rollout" in options:
        _rollout(state, options.get("alias"), body.lorafleet.rollout)
    if "schema" in options:
        check_client_schema(options["schema"], param="lorafleet.schema")
    if options.get("save_every") and options.get("eval_every") and options["save_every"] % options["eval_every"]:
        raise _invalid(
            f"lorafleet.save_every {options['save_every']} must be a multiple of lorafleet.eval_every "
            f"{options['eval_every']} (the best checkpoint is kept at the end).",
            "lorafleet.save_every",
        )
    if options.get("rank", 0) > state.settings.max_lora_rank:
        raise _invalid(
            f"lorafleet.rank {options['rank']} is over the engines' max_lora_rank {state.settings.max_lora_rank}.",
            "lorafleet.rank",
        )
    try:
        job = state.jobs.create(
            tenant.id,
            tenant.limits.queued_jobs,
            model=body.model,
            base_model=base,
            parent=parent,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else _seed(),
            hyperparameters=hyperparameters,
            options=options,
            metadata=body.metadata,
        )
    except JobLimitReached as exc:
        raise APIError(ErrorCode.JOB_QUOTA_EXCEEDED, str(exc), headers={"x-should-retry": "false"}) from exc
    return job.as_openai(tenant.name)


def _seed() -> int:
    import secrets

    return secrets.randbelow(2**31)


def refused(exc: JobError) -> APIError:
    if isinstance(exc, JobNotFound):
        return APIError(ErrorCode.JOB_NOT_FOUND, str(exc), param="fine_tuning_job_id")
    if isinstance(exc, JobStateError):
        return APIError(ErrorCode.JOB_STATE, str(exc))
    return APIError(ErrorCode.INVALID_JOB, str(exc), param="after")


@router.post("")
async def create_job(request: Request, tenant: TenantDep, state: StateDep) -> dict[str, Any]:
    """Create a fine-tuning job; a worker validates its files, trains, and publishes the model."""
    body = _parse(await request.body())
    return await asyncio.to_thread(_create, state, tenant, body)


@router.get("")
async def list_jobs(
    request: Request,
    tenant: TenantDep,
    state: StateDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=20, ge=1, le=100),
) -> dict[str, Any]:
    """The tenant's jobs, newest first; ``metadata[k]=v`` keeps the jobs whose metadata has that pair."""
    wanted = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            wanted[key[len("metadata[") : -1]] = value
    try:
        jobs, more = await asyncio.to_thread(state.jobs.page, tenant.id, after=after, limit=limit, metadata=wanted)
    except JobError as exc:
        raise refused(exc) from exc
    return {"object": "list", "data": [j.as_openai(tenant.name) for j in jobs], "has_more": more}


@router.get("/{job_id}")
async def retrieve_job(job_id: str, tenant: TenantDep, state: StateDep) -> dict[str, Any]:
    try:
        job = await asyncio.to_thread(state.jobs.get, tenant.id, job_id)
    except JobError as exc:
        raise refused(exc) from exc
    return job.as_openai(tenant.name)


@router.post("/{job_id}/{action}")
async def act_on_job(
    job_id: str, action: Literal["cancel", "pause", "resume"], tenant: TenantDep, state: StateDep
) -> dict[str, Any]:
    """Cancel (ends it at once), pause (after the current step, with a checkpoint) or resume (from it)."""
    operation = {"cancel": state.jobs.cancel, "pause": state.jobs.pause, "resume": state.jobs.resume}[action]
    try:
        job = await asyncio.to_thread(operation, tenant.id, job_id)
    except JobError as exc:
        raise refused(exc) from exc
    return job.as_openai(tenant.name)


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    tenant: TenantDep,
    state: StateDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=20, ge=1, le=1000),
) -> dict[str, Any]:
    try:
        events, more = await asyncio.to_thread(state.jobs.events, tenant.id, job_id, after, limit)
    except JobError as exc:
        raise refused(exc) from exc
    return {"object": "list", "data": events, "has_more": more}


@router.get("/{job_id}/checkpoints")
async def job_checkpoints(
    job_id: str,
    tenant: TenantDep,
    state: StateDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=10, ge=1, le=100),
) -> dict[str, Any]:
    try:
        checkpoints, more = await asyncio.to_thread(state.jobs.checkpoints, tenant.id, job_id, after, limit)
    except JobError as exc:
        raise refused(exc) from exc
    return cursor_page(checkpoints, more)
