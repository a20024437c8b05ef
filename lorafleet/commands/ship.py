"""``lorafleet ship``: new data to the version that serves an alias's users, through the gateway's API.

    lorafleet ship data.jsonl --alias orders [--validation held.jsonl] [--base MODEL] [--watch]

Uploads the data (OpenAI's files API), creates a fine-tuning job into the alias
(``lorafleet.alias``), and with ``--watch`` follows it until the verdict: the
training's progress, the gate's table, the canary's steps with each version's
numbers. It is a client of the gateway like any app (the official openai SDK, a
tenant key), so it runs anywhere the gateway can be reached:
``LORAFLEET_GATEWAY_URL`` or ``--gateway``, the key from ``--key-file`` or
``LORAFLEET_API_KEY``.

Exit status with ``--watch``: 0 promoted; 3 the job failed or was cancelled
(or succeeded with no rollout: a worker from before rollouts); 4 the gate
failed; 5 the canary rolled back (or was aborted, or never started); 2 nothing
was shipped (a refusal, the gateway out of reach) or the watch was refused
(the key revoked).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.console import console, err, fail

PROMOTED, REFUSED, JOB_FAILED, GATE_FAILED, ROLLED_BACK = 0, 2, 3, 4, 5
ENDINGS = {
    "promoted": PROMOTED,
    "gate_failed": GATE_FAILED,
    "rolled_back": ROLLED_BACK,
    "aborted": ROLLED_BACK,
    "not_started": ROLLED_BACK,
}


@dataclass
class Phases:
    """When the watch first saw each phase of the run (monotonic seconds), for ``--timings`` and the benchmark."""

    started: float = field(default_factory=time.monotonic)
    seen: dict[str, float] = field(default_factory=dict)

    def note(self, phase: str) -> None:
        self.seen.setdefault(phase, time.monotonic())

    def as_dict(self) -> dict[str, float]:
        """Each phase's duration: from its first sighting to the next phase's (the last one's to the end)."""
        marks = sorted(self.seen.items(), key=lambda kv: kv[1])
        ends = [t for _, t in marks[1:]] + [time.monotonic()]
        return {name: round(end - start, 3) for (name, start), end in zip(marks, ends, strict=True)}


def phase_of(job: Any) -> str:
    """The run's phase, from the job as the API shows it."""
    extra = job.model_extra.get("lorafleet") or {}
    rollout = extra.get("rollout") or {}
    if job.status == "validating_files":
        return "validation"
    if job.status in ("queued", "paused"):
        return "queue"
    if job.status == "running":
        return "gate" if (extra.get("progress") or {}).get("phase") == "gate" else "training"
    if job.status == "succeeded" and rollout.get("state") == "canary_pending":
        return "rollout start"  # a gateway starts the canary (or promotes a first version)
    if job.status == "succeeded" and rollout.get("state") == "canary":
        return "canary"
    return "done"


def ship(
    data: Annotated[Path, typer.Argument(help="Training examples (JSONL, any training format).")],
    alias: Annotated[str, typer.Option(help="The alias to ship a new version of (granted to your tenant alone).")],
    validation: Annotated[
        Path | None, typer.Option(help="Held-out examples to gate on (default: a seeded share of DATA).")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model to fine-tune (default: the one the alias serves on).")
    ] = None,
    watch: Annotated[bool, typer.Option(help="Follow the run until its verdict; the exit status says which.")] = False,
    gateway: Annotated[
        str | None, typer.Option(envvar="LORAFLEET_GATEWAY_URL", help="The gateway's URL (default: this machine's).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="A file holding the tenant key (default: LORAFLEET_API_KEY).")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="A name for the job's model (OpenAI's suffix).")] = None,
    options: Annotated[
        str | None,
        typer.Option(help='More of the job\'s lorafleet object, as JSON: \'{"max_steps": 40, "rollout": {...}}\'.'),
    ] = None,
    timings: Annotated[Path | None, typer.Option(help="With --watch: write each phase's seconds here (JSON).")] = None,
    poll_s: Annotated[float, typer.Option(help="With --watch: seconds between looks.")] = 1.0,
) -> None:
    """Fine-tune a new version of ALIAS on DATA through the gateway; gated, canaried, promoted or rolled back."""
    import openai

    api = _client(gateway, key_file)
    extra = _options(options) | {"alias": alias}
    phases = Phases()
    try:
        with data.open("rb") as handle:
            training = api.files.create(file=(data.name, handle), purpose="fine-tune")
        held = None
        if validation is not None:
            with validation.open("rb") as handle:
                held = api.files.create(file=(validation.name, handle), purpose="fine-tune").id
        model = base or alias  # the alias itself: its version's base, trained afresh
        job = api.fine_tuning.jobs.create(
            model=model,
            training_file=training.id,
            validation_file=held,
            suffix=suffix,
            extra_body={"lorafleet": extra},
        )
    except OSError as exc:
        raise fail(f"{exc.filename}: {exc.strerror}") from exc
    except openai.APIStatusError as exc:
        raise fail(_refusal(exc)) from exc
    except openai.APIConnectionError as exc:
        raise fail(f"the gateway at {api.base_url} cannot be reached ({exc}); set --gateway") from exc
    console.print(f"{job.id}: {model} on {data.name} -> {alias} (status {job.status})", highlight=False)
    if not watch:
        console.print(f"follow it: lorafleet ship --watch ... or GET /v1/fine_tuning/jobs/{job.id}", highlight=False)
        return
    code = Watch(api, job.id, phases, poll_s).run()
    if timings is not None:
        timings.write_text(json.dumps({"job": job.id, "exit": code, "phases": phases.as_dict()}, indent=2) + "\n")
    raise typer.Exit(code)


class Watch:
    """Follows one job: its new events as they come, the gate's table once, the canary's numbers at each step."""

    def __init__(self, api: Any, job_id: str, phases: Phases, poll_s: float) -> None:
        self.api, self.job_id, self.phases, self.poll_s = api, job_id, phases, poll_s
        self.seen: set[str] = set()

    def run(self) -> int:
        import openai

        while True:
            try:
                job = self.api.fine_tuning.jobs.retrieve(self.job_id)
                self.phases.note(phase_of(job))
                self._events()
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                # the gateway restarting, warming up or busy: look again
                err.print(f"(the gateway did not answer: {exc}; trying again)", highlight=False, markup=False)
                time.sleep(max(self.poll_s, 2.0))
                continue
            except openai.APIStatusError as exc:  # the key revoked, the job gone: nothing more to watch
                err.print("[bold red]error:[/] ", end="")
                err.print(f"watching {self.job_id}: {_refusal(exc)}", highlight=False, markup=False)
                return REFUSED
            ending = self._ending(job)
            if ending is not None:
                return ending
            time.sleep(self.poll_s)

    def _events(self) -> None:
        """The events not shown yet, oldest first (pages back until one already shown)."""
        fresh: list[Any] = []
        after = None
        while True:
            page = self.api.fine_tuning.jobs.list_events(self.job_id, limit=100, **({"after": after} if after else {}))
            new = [e for e in page.data if e.id not in self.seen]
            fresh += new
            if not page.has_more or len(new) < len(page.data) or not page.data:
                break
            after = page.data[-1].id
        for event in reversed(fresh):
            self.seen.add(event.id)
            show(event)

    def _ending(self, job: Any) -> int | None:
        if job.status in ("failed", "cancelled"):
            reason = (job.error.message if job.error else None) or job.status
            err.print(f"the job {job.status}: {reason}", highlight=False, markup=False)
            return JOB_FAILED
        rollout = (job.model_extra.get("lorafleet") or {}).get("rollout") or {}
        state = rollout.get("state")
        if job.status == "succeeded" and not rollout:  # a worker from before rollouts published it, no more
            err.print(
                f"the job succeeded ({job.fine_tuned_model}) with no rollout: promote it by hand", highlight=False
            )
            return JOB_FAILED
        if job.status != "succeeded" or state not in ENDINGS:
            return None
        ref = f"{rollout['alias']}@{rollout['version']}"
        if state == "promoted":
            console.print(f"promoted: {ref} serves {rollout['alias']}", highlight=False)
        else:
            err.print(f"{state.replace('_', ' ')}: {ref} ({rollout.get('reason')})", highlight=False, markup=False)
        return ENDINGS[state]


def show(event: Any) -> None:
    """One event: its line, and the gate's table or the canary's numbers where it carries them."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.created_at))
    style = {"warn": "yellow", "error": "red"}.get(event.level)
    console.print(f"{stamp} {event.message}", style=style, highlight=False, markup=False)  # "[5, 25]" is no markup
    data = event.data or {}
    if isinstance(data, dict) and data.get("table"):
        console.print(gate_table(data), highlight=False)
    elif isinstance(data, dict) and data.get("numbers"):
        console.print(canary_table(data["numbers"]), highlight=False)


def gate_table(gate: dict[str, Any]) -> Any:
    from rich.table import Table

    scored = gate.get("scored_on") or {}
    table = Table(
        "target", "mode", "n", "parsed", "schema-valid", "exact", "fields", title=f"gate on {scored.get('source')}"
    )
    for row in gate["table"]:
        accuracy = row.get("field_accuracy")
        table.add_row(
            str(row["target"]),
            str(row["mode"]),
            str(row["n"]),
            f"{row['parse_rate']:.3f}",
            f"{row['schema_valid_rate']:.3f}",
            f"{row['exact_match_rate']:.3f}",
            "-" if accuracy is None else f"{accuracy:.3f}",
        )
    return table


def canary_table(numbers: dict[str, Any]) -> Any:
    """The canary's last analysis: each metric, stable against the candidate; or, while it waits, the counts."""
    from rich.table import Table

    metrics = (numbers.get("analysis") or {}).get("metrics") or []
    if metrics:
        table = Table("metric", "stable", "candidate", "n (stable/candidate)", "p", "regression", title="canary")
        for m in metrics:
            table.add_row(
                str(m["metric"]),
                _number(m.get("stable")),
                _number(m.get("canary")),
                f"{m.get('n_stable')}/{m.get('n_canary')}",
                _number(m.get("p_value")),
                "yes" if m.get("regression") else m.get("note", "no"),
            )
        return table
    table = Table("version", "requests", "JSON-checked", "valid", "errors", title="canary window")
    for variant in ("stable", "canary"):
        w = (numbers.get("window") or {}).get(variant) or {}
        table.add_row(variant, *(str(w.get(k, 0)) for k in ("requests", "json_checked", "valid", "errors")))
    return table


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _client(gateway: str | None, key_file: Path | None) -> Any:
    import openai

    from contract.settings import CommonSettings
    from lorafleet.admin_client import running_gateway

    url = gateway or running_gateway(CommonSettings())
    if not url:
        raise fail("no gateway: set LORAFLEET_GATEWAY_URL or --gateway (none runs on this machine's data folder)")
    try:
        key = key_file.read_text("utf-8").strip() if key_file else os.environ.get("LORAFLEET_API_KEY", "")
    except OSError as exc:
        raise fail(f"{key_file}: {exc.strerror}") from exc
    if not key:
        raise fail("no tenant key: give --key-file or set LORAFLEET_API_KEY")
    return openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=key, max_retries=2, timeout=120)


def _options(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"--options is not JSON ({exc.msg} at character {exc.pos})") from exc
    if not isinstance(parsed, dict):
        raise fail("--options must be a JSON object, e.g. '{\"max_steps\": 40}'")
    return parsed


def _refusal(exc: Any) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    param = body.get("param")
    return f"{exc.status_code} {body.get('message') or exc.message}" + (f" (field {param})" if param else "")
