"""One fine-tuning job's training, in its own process, wherever the executor runs it.

    python -m finetune.runner --job ftjob-... --worker host:1234:ab12

The worker (local executor) or Ray (ray executor) starts this with the
service's settings in its environment; it needs the state database and the
shared folders (files, jobs, adapters), never the gateway. It

1. reads the job and its files (``files_dir/<tenant>/<file id>``), resolves the
   ``"auto"`` hyperparameters from the base model's recipe and shows them on
   the job;
2. trains with ``training.train`` into ``jobs_dir/<job id>/adapter`` (resuming
   from the last checkpoint there when a paused or lost run left one), writing
   a ``metrics`` event every logging step, the job's progress and estimated
   finish, and a checkpoint row for every checkpoint saved;
3. on success: checks the adapter against its base (``contract.fit``), writes
   the step-metrics CSV as a result file, and, in one transaction with the
   job's ``succeeded``, publishes the adapter to the store under the job's
   model name and grants it to the tenant. The gateways serve it from there.

Every write about the job is conditional on this worker still holding it: a
job cancelled meanwhile publishes nothing. SIGTERM (pause) finishes the current
step, saves a checkpoint and exits with ``PAUSED``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from transformers import TrainerCallback

from contract.examples import DataError, check
from contract.fit import problems_on_its_base
from finetune.executors import bind_to_parent
from finetune.gate import GateError, GateResult, run_gate
from finetune.recipes import resolve, train_settings
from finetune.settings import WorkerSettings
from finetune.validate import file_error
from finetune.worker import clean_work
from serving.state.db import state_engine
from serving.state.files import RESULTS, FileStore
from serving.state.jobs import Job, JobStateError, JobStore, event_in, fine_tuned_name
from serving.state.ledger import open_store
from serving.state.policies import AliasPolicies
from serving.state.rollouts import rollout_values
from serving.state.tenants import alone_in, grant_in
from training.checkpoints import last_checkpoint, staging_of
from training.config import ConfigError, TrainConfig
from training.train import Interrupted, train

log = logging.getLogger("lorafleet.runner")

PAUSED = 75  # exit status: stopped on SIGTERM after saving a checkpoint (the worker marks the job paused)
LOST = 3  # exit status: the job is no longer this worker's (cancelled, or taken over)
LOG_EVERY = 5  # a metrics event every N steps, unless the job says otherwise
DEFAULT_SPLIT = 0.1  # without a validation file: the share of the training file held out


class Lost(Exception):
    """The job is no longer this worker's: cancelled, or taken over after its lease ran out."""


class JobReporter(TrainerCallback):
    """Writes the training's progress into the job (metrics events, progress, estimated finish, checkpoints),
    and reads what was asked of it: a cancel stops the training at once (``Lost``), a pause after this step with
    a checkpoint (asked the way Ctrl-C asks, ``training.progress.StopOnSignal``)."""

    def __init__(
        self,
        jobs: JobStore,
        job: Job,
        worker: str,
        check_every_s: float = 2.0,
        announce: Callable[[dict[str, Any]], None] | None = None,
        stop_asked: threading.Event | None = None,
    ) -> None:
        self.jobs, self.job, self.worker, self.check_every_s = jobs, job, worker, check_every_s
        self.stop_asked = stop_asked
        self.announce = announce  # a job into an alias: its training announced where gateways look (503 + ETA)
        self.checked = 0.0
        self.pausing = False
        self.started = 0.0
        self.first_step = 0
        self.tokens_at_start = 0
        self.latest: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.started = time.time()
        self.first_step = state.global_step
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)
        resumed = f" (resumed at step {state.global_step})" if state.global_step else ""
        self.jobs.add_event(self.job.id, f"Training started: {state.max_steps} steps{resumed}.")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not logs or not state.is_world_process_zero or not {"loss", "eval_loss"} & logs.keys():
            return  # the end-of-run summary (runtime, mean loss) is not a step's metrics
        if "loss" in logs:
            self.latest["train_loss"] = round(float(logs["loss"]), 6)
        if "eval_loss" in logs:
            self.latest["valid_loss"] = round(float(logs["eval_loss"]), 6)
        elapsed = time.time() - self.started
        done = state.global_step - self.first_step
        # This step's own figures (a chart of the events plots each loss where it was measured); the job's progress
        # keeps the latest of both.
        measured = {"train_loss": "loss", "valid_loss": "eval_loss"}
        data: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
        data |= {name: self.latest[name] for name, key in measured.items() if key in logs}
        if "learning_rate" in logs:
            data["learning_rate"] = float(logs["learning_rate"])
        if state.num_input_tokens_seen and elapsed > 0:
            data["tokens_per_s"] = round((state.num_input_tokens_seen - self.tokens_at_start) / elapsed, 1)
        finish = None
        if done > 0:
            finish = int(time.time() + elapsed / done * (state.max_steps - state.global_step))
        message = f"Step {state.global_step}/{state.max_steps}: " + ", ".join(
            f"{k} {data[k]}" for k in measured if k in data
        )
        self.jobs.add_event(self.job.id, message, type_="metrics", data=data)
        self.jobs.update(
            self.job.id,
            self.worker,
            progress=data | self.latest | {"tokens_seen": int(state.num_input_tokens_seen or 0)},
            estimated_finish=finish,
        )
        if self.announce is not None:
            status = {"phase": "training", "step": state.global_step, "max_steps": state.max_steps}
            if finish is not None:
                status["eta_s"] = max(0, finish - int(time.time()))
            if "train_loss" in self.latest:
                status["loss"] = self.latest["train_loss"]
            if "tokens_per_s" in data:
                status["tokens_per_s"] = data["tokens_per_s"]
            self.announce(status)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.stop_asked is not None and self.stop_asked.is_set() and not self.pausing:
            self.pausing = True  # a stop noted before the training took over SIGTERM: asked again, now heard
            signal.raise_signal(signal.SIGTERM)
        now = time.monotonic()
        if now - self.checked < self.check_every_s:
            return
        self.checked = now
        current = self.jobs.get(None, self.job.id)
        if current.status != "running" or current.worker != self.worker:
            raise Lost(f"job {self.job.id} is {current.status} (worker {current.worker})")
        if current.desired == "pause" and not self.pausing:
            self.pausing = True
            signal.raise_signal(signal.SIGTERM)  # StopOnSignal, after this callback: checkpoint, then stop

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.is_world_process_zero:
            metrics = {"step": float(state.global_step)} | {
                k: v for k, v in self.latest.items() if k in ("train_loss", "valid_loss")
            }
            self.jobs.add_checkpoint(self.job.id, state.global_step, metrics)


class Runner:
    def __init__(
        self, settings: WorkerSettings, job_id: str, worker: str, stop_asked: threading.Event | None = None
    ) -> None:
        self.settings, self.worker = settings, worker
        self.stop_asked = stop_asked or threading.Event()
        engine = state_engine(settings.state_url)
        self.jobs = JobStore(engine)
        self.files = FileStore(engine, settings.files_root, max_bytes=1 << 62, quota_bytes=1 << 62)
        self.job = self.jobs.get(None, job_id)
        self.work = settings.jobs_root / job_id

    def run(self) -> int:
        job = self.job
        if job.status != "running" or job.worker != self.worker:
            return LOST
        announce = self._announcer()
        try:
            return self._train(announce)
        finally:
            if announce is not None:  # published, failed or stopped: nobody is to wait on this run any more
                open_store(self.settings).end_training(str(job.options["alias"]))

    def _train(self, announce: Callable[[dict[str, Any]], None] | None) -> int:
        job = self.job
        try:
            cfg = self._config()
            if self.stop_asked.is_set():  # its worker stopped before the training began: back to the queue
                message = (
                    f"Worker {self.worker.split('#')[0]} stopped before the training began; the job is queued again."
                )
                return PAUSED if self.jobs.release(job.id, self.worker, "queued", message) else LOST
            manifest = train(
                cfg,
                self.settings.model_path(job.base_model),
                resume=last_checkpoint(staging_of(cfg.out)) is not None,
                callbacks=[JobReporter(self.jobs, job, self.worker, announce=announce, stop_asked=self.stop_asked)],
            )
        except Interrupted as exc:
            if self.jobs.get(None, job.id).desired == "pause":
                message = f"Job paused at step {exc.step} (checkpoint saved); resume continues from it."
                return PAUSED if self.jobs.release(job.id, self.worker, "paused", message) else LOST
            # its worker is stopping: queued again at once, to go on from this checkpoint on whichever worker
            worker = self.worker.split("#")[0]
            message = f"Worker {worker} stopped at step {exc.step} (checkpoint saved); the job is queued again."
            return PAUSED if self.jobs.release(job.id, self.worker, "queued", message) else LOST
        except Lost:
            if self.jobs.get(None, job.id).status == "cancelled":  # nothing of it is kept (taken over: the new
                clean_work(self.work)  # worker goes on from its checkpoints)
            return LOST
        except DataError as exc:
            which = "validation_file" if job.validation_file and exc.report.path.name == job.validation_file else None
            param = which or "training_file"
            return self._fail(file_error(exc.report, getattr(job, param), param))
        except ConfigError as exc:
            return self._fail({"code": "invalid_hyperparameters", "param": "lorafleet", "message": str(exc)})
        return self._publish(cfg.out, manifest, cfg)

    def _announcer(self) -> Callable[[dict[str, Any]], None] | None:
        alias = self.job.options.get("alias")
        if not alias:
            return None
        store = open_store(self.settings)
        if store.latest(alias) is not None:
            return None  # the alias serves already: nobody waits for this version
        return lambda status: store.announce_training(alias, status)

    def _config(self) -> TrainConfig:
        """The job's ``TrainConfig``: its files, the recipe, its hyperparameters and ``lorafleet`` options."""
        job, settings = self.job, self.settings
        data = self.files.path(self.files.get(job.tenant_id, job.training_file))
        eval_data = None
        if job.validation_file:
            eval_data = self.files.path(self.files.get(job.tenant_id, job.validation_file))
        examples = len(check(data, min_examples=0).examples)
        resolved = resolve(job.hyperparameters, job.base_model, examples)
        self.jobs.update(job.id, self.worker, hyperparameters=resolved)
        fields = train_settings(resolved, job.options, job.base_model)
        fields.pop("val_fraction", None)
        schema_file = None
        if job.options.get("schema") is not None:  # the answers' schema: checked, and the model's default schema
            self.work.mkdir(parents=True, exist_ok=True)
            schema_file = self.work / "schema.json"
            schema_file.write_text(json.dumps(job.options["schema"]))
        asked_eval = fields.pop("eval_every", None)
        save_every = fields.pop("save_every", None)
        if save_every is None:  # the default, made a multiple of the evaluations asked for (the best is kept)
            save_every = settings.job_save_every
            if asked_eval:
                save_every = asked_eval * max(1, round(save_every / asked_eval))
        split = job.options.get("val_fraction", DEFAULT_SPLIT)
        evaluating = eval_data is not None or (split > 0 and examples >= 10)
        fields |= {
            "data": data,
            "eval_data": eval_data,
            "val_fraction": 0.0 if eval_data is not None or not evaluating else split,
            "out": self.work / "adapter",
            "task": model_name(job),
            "schema": schema_file,
            "base_model": job.base_model,
            "seed": job.seed,
            "save_every": save_every,
            "eval_every": (asked_eval or save_every) if evaluating else 0,
            "log_every": job.options.get("log_every", LOG_EVERY),
            "max_lora_rank": settings.max_lora_rank,
        }
        if job.parent:
            parent = open_store(settings).serving(job.parent)
            if parent is None:
                raise ConfigError(f"model {job.parent!r}, which this job continues, is no longer served")
            fields["init_adapter"] = parent.path
        try:
            return TrainConfig.model_validate(fields)
        except ValidationError as exc:  # named by field and rule, never with the values (server paths among them)
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ConfigError(f"the job's settings were refused: {reasons}") from exc

    def _publish(self, adapter: Path, manifest: Any, cfg: TrainConfig) -> int:
        """Check the adapter, write the result file, then publish, grant and succeed in one transaction (a job into
        an alias gates its version first: ``_publish_into``)."""
        job, settings = self.job, self.settings
        problems = problems_on_its_base(
            adapter, settings.models_dir, settings.model_path(job.base_model), settings.max_lora_rank
        )
        if problems:
            reasons = "; ".join(p.replace(str(adapter), "the adapter") for p in problems)
            return self._fail({"code": "adapter_unservable", "param": None, "message": reasons})
        if job.options.get("alias"):
            return self._publish_into(str(job.options["alias"]), adapter, manifest, cfg)
        name = model_name(job)
        result = self._result_file(adapter)
        store = open_store(settings)
        published: Any = None
        try:
            with self._succeeding(manifest, name, result) as db:
                published = store.publish(adapter, name)
                grant_in(db, job.tenant_id, name)  # a new model: the tenant's alone
                event_in(db, job.id, f"New fine-tuned model created: {name} (version {published.version}).")
                event_in(db, job.id, "The job has successfully completed.")
        except JobStateError:
            self.files.delete(job.tenant_id, result.id)
            return LOST
        except BaseException:
            if published is not None:  # published, then the job's record could not be written: take it back
                store.retire(published.alias, published.version, reason=f"job {job.id} did not finish", actor="worker")
            raise
        log.info("job %s: published %s", job.id, published.ref)
        clean_work(self.work)
        return 0

    def _publish_into(self, alias: str, adapter: Path, manifest: Any, cfg: TrainConfig) -> int:
        """A job into an alias: gate the version (``finetune.gate``), publish it with its verdict, and succeed with
        the rollout's first state; the gateways take it from there (the canary, or the promotion)."""
        job = self.job
        store = open_store(self.settings)
        if not self._alone(alias):  # before the gate: never score another tenant's version
            return self._alias_taken(alias)
        baseline = self._baseline(store, alias)
        gate, why = self._gate(alias, adapter, cfg, store, baseline)
        if not self.jobs.update(job.id, self.worker, progress={"phase": "publishing"}):
            if self.jobs.get(None, job.id).status == "cancelled":
                clean_work(self.work)
            return LOST  # cancelled (or taken over) during the gate: nothing is published
        if not self._alone(alias):
            return self._alias_taken(alias)
        rollout: dict[str, Any] = {
            "alias": alias,
            "stable": baseline.version if baseline else None,
            "gate": _gate_summary(gate, why),
            "canary": None,
            "reason": None,
        }
        passed = gate is not None and gate.passed
        published: Any = None
        result: Any = None
        try:
            result = self._result_file(adapter)
            published = store.publish(adapter, alias)
            rollout["version"] = published.version
            if gate is not None:
                store.record_gate(published, gate.verdict | {"target": published.ref})
            if passed:
                rollout["state"] = "canary_pending"
                assert gate is not None
                next_step = "a canary starts" if baseline else "it is promoted (the alias had no version serving)"
                verdict = f"Gate passed against {gate.against}: {next_step}."
            else:
                rollout["state"] = "gate_failed"
                rollout["reason"] = why or "; ".join(gate.failures() if gate else [])
                if baseline is None:  # the newest version of an alias with no stable one serves: never this one
                    store.retire(alias, published.version, reason=f"failed its gate: {rollout['reason']}", actor="job")
                verdict = f"Gate failed: {rollout['reason']}. {published.ref} stays published and unserved."
            with self._succeeding(manifest, alias, result, rollout_values(rollout)) as db:
                if not alone_in(db, job.tenant_id, alias):  # granted to it alone, still
                    raise AliasTaken(alias)
                event_in(db, job.id, f"New version of {alias} created: {published.ref}.")
                level = "info" if passed else "warn"
                event_in(db, job.id, verdict, level=level, data=rollout["gate"])
                event_in(db, job.id, "The job has successfully completed.")
        except (JobStateError, AliasTaken) as exc:
            self._take_back(store, published, result)
            return LOST if isinstance(exc, JobStateError) else self._alias_taken(alias)
        except BaseException:
            self._take_back(store, published, result)
            raise
        log.info("job %s: published %s (%s)", job.id, published.ref, rollout["state"])
        clean_work(self.work)
        return 0

    def _baseline(self, store: Any, alias: str) -> Any:
        """What the version is gated and canaried against: the alias's stable version, else the version it serves
        (its newest, published before the alias had a stable one: made stable now, so the new version neither
        serves at once nor goes without a canary), else nothing (gated against the base model)."""
        stable = store.stable(alias)
        if stable is not None:
            return stable
        serving = store.serving(alias)
        if serving is None:
            return None
        reason = f"it served {alias} with no stable version; made stable for job {self.job.id}'s canary to compare with"
        store.promote(alias, serving.version, force=True, reason=reason, actor=f"job:{self.job.id}", expected=None)
        self.jobs.add_event(self.job.id, f"{serving.ref} was serving {alias} as its newest version; it is now stable.")
        return serving

    def _take_back(self, store: Any, published: Any, result: Any) -> None:
        """The job did not end as this run: its result file and its version (retired, if published) go."""
        if result is not None:
            self.files.delete(self.job.tenant_id, result.id)
        if published is None:
            return
        try:
            if not store.is_retired(published):
                reason = f"job {self.job.id} did not finish"
                store.retire(published.alias, published.version, reason=reason, actor="worker")
        except Exception:  # said, without hiding why the job did not finish
            log.exception("job %s: %s could not be retired; retire it by hand", self.job.id, published.ref)

    def _gate(
        self, alias: str, adapter: Path, cfg: TrainConfig, store: Any, baseline: Any
    ) -> tuple[GateResult | None, str | None]:
        """The gate's result, or ``None`` and why it could not be run (then the version is published, unserved)."""
        settings, job = self.settings, self.job
        self.jobs.update(job.id, self.worker, progress={"phase": "gate"}, estimated_finish=None)
        against = baseline.ref if baseline else "the base model"
        self.jobs.add_event(job.id, f"Gating the new version of {alias} against {against} on held-out data.")
        policies = AliasPolicies(self.jobs.engine)
        served = policies.get(alias)  # the gate judges as the alias is served: its JSON mode and default schema
        mode = "constrained" if served.json_mode == "enforce" else "unconstrained"
        try:
            gate = run_gate(
                cfg,
                adapter,
                alias,
                store,
                settings.model_path(job.base_model),
                settings.models_dir,
                policies.rollout(alias).gate,
                mode,
                served.default_schema,
                baseline,
            )
        except GateError as exc:
            return None, str(exc)
        except Exception as exc:  # the engine would not start, a target would not load: the training is kept
            log.exception("job %s: the gate could not run", job.id)
            return None, f"the gate could not run ({type(exc).__name__}); an operator can read why in the job's log"
        return gate, None

    def _alone(self, alias: str) -> bool:
        with self.jobs.engine.connect() as db:
            return alone_in(db, self.job.tenant_id, alias)

    def _alias_taken(self, alias: str) -> int:
        message = f"lorafleet.alias {alias!r} is no longer yours alone (its grants changed); nothing was published."
        return self._fail({"code": "alias_not_yours", "param": "lorafleet.alias", "message": message})

    def _result_file(self, adapter: Path) -> Any:
        return self.files.add(
            self.job.tenant_id,
            f"{self.job.id}-step-metrics.csv",
            RESULTS,
            io.BytesIO(_metrics_csv(adapter)),
            made_here=True,
        )

    def _succeeding(
        self, manifest: Any, name: str, result: Any, extra: dict[str, Any] | None = None
    ) -> AbstractContextManager[Any]:
        """The job's ``succeeded`` transaction (``JobStore.finishing``) with its model, tokens and result file."""
        return self.jobs.finishing(
            self.job.id,
            self.worker,
            "succeeded",
            fine_tuned_model=name,
            trained_tokens=int(manifest.metrics.get("tokens_seen") or 0),
            result_files=[result.id],
            progress=None,
            **(extra or {}),
        )

    def _fail(self, error: dict[str, Any]) -> int:
        try:
            with self.jobs.finishing(self.job.id, self.worker, "failed", error=error, progress=None) as db:
                event_in(db, self.job.id, f"Fine-tuning job failed: {error['message']}", level="error")
        except JobStateError:
            return LOST
        clean_work(self.work)
        return 0


class AliasTaken(Exception):
    """The alias a job publishes into is no longer granted to its tenant alone."""


def _gate_summary(gate: GateResult | None, why: str | None) -> dict[str, Any]:
    """What the job shows of its gate: passed, against what, on which examples, each check and the table."""
    if gate is None:
        return {"passed": False, "against": None, "error": why}
    verdict = gate.verdict
    return {
        "passed": gate.passed,
        "against": gate.against,
        "scored_on": verdict["scored_on"],
        "modes": verdict["modes"],
        "thresholds": verdict["thresholds"],
        "checks": verdict["checks"],
        "table": gate.table,
    }


def model_name(job: Job) -> str:
    """The model a job makes: the alias it targets (``lorafleet.alias``), else a new ``ft-...`` name."""
    return str(job.options.get("alias") or fine_tuned_name(job.base_model, job.suffix, job.id))


def _metrics_csv(adapter: Path) -> bytes:
    """The step metrics of a run (its ``metrics.jsonl``) as OpenAI's result file: one row per logged step."""
    rows: dict[int, dict[str, Any]] = {}
    path = adapter / "metrics.jsonl"
    for line in path.read_text("utf-8").splitlines() if path.is_file() else []:
        entry = json.loads(line)
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "eval_loss" in entry:
            row["valid_loss"] = entry["eval_loss"]
        if "learning_rate" in entry:
            row["learning_rate"] = entry["learning_rate"]
    out = io.StringIO()
    writer = csv.DictWriter(out, ["step", "train_loss", "valid_loss", "learning_rate"], lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue().encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    bind_to_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A stop asked before the training takes over SIGTERM (loading, preparing) or after it (publishing) is noted,
    # not obeyed mid-step: the training checkpoints on it, publishing finishes.
    asked = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: asked.set())
    runner = Runner(WorkerSettings(), args.job, args.worker, stop_asked=asked)
    try:
        return runner.run()
    except Exception as exc:  # anything else: the job fails; what happened goes to the log, not to the tenant
        log.exception("job %s failed", args.job)
        message = (
            f"The training failed ({type(exc).__name__}); an operator can read why in the job's training log "
            f"(job {args.job})."
        )
        return runner._fail({"code": "training_error", "param": None, "message": message})


if __name__ == "__main__":
    sys.exit(main())
