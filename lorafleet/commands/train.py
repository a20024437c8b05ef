"""``lorafleet train``: fine-tune a LoRA adapter, optionally publishing it.

Its flags are generated from ``training.config.TrainConfig`` (one per field, the
field's description as help); ``--config`` reads the same fields from YAML.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import typer

from contract.settings import CommonSettings
from lorafleet.commands.adapters import publish_adapter
from lorafleet.commands.model import require_base_model
from lorafleet.console import console, fail


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
    from serving.state.ledger import open_store
    from training.config import ConfigError, load_config
    from training.train import Interrupted, is_main_process
    from training.train import train as run_training

    settings = CommonSettings()
    try:
        cfg = load_config(config, fields)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    for path in [cfg.data, cfg.eval_data, cfg.schema_file]:
        if path is not None and not path.is_file():
            raise fail(f"{path}: no such file")
    base_model = settings.model_path(cfg.base_model or settings.base_model)
    require_base_model(settings, base_model)
    # With --publish, the run is announced in the store: a gateway tells clients of a new alias when its first
    # version will be servable (503 with the ETA) instead of 404.
    store = open_store(settings)
    announce = (lambda status: store.announce_training(publish, status)) if publish and is_main_process() else None
    try:
        if announce is not None:
            announce({"phase": "preparing"})
        try:
            manifest = run_training(cfg, base_model, resume=resume, announce=announce)
        except Interrupted as exc:
            console.print(f"training {exc}; `lorafleet train ... --resume` continues it", highlight=False)
            raise typer.Exit(130) from exc
        except (DataError, ValueError) as exc:
            raise fail(str(exc)) from exc
        if not is_main_process():
            return  # under `accelerate launch`, process 0 reports and publishes
        _print_summary(cfg.out, manifest)
        if publish:
            publish_adapter(settings, cfg.out, publish)  # which ends the announcement
    finally:
        if announce is not None and publish:
            store.end_training(publish)  # a failed or stopped run must not leave clients waiting


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
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(None, help="YAML file of the fields below; flags override it."),
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, help="Continue a killed run from its last checkpoint."),
        ),
        inspect.Parameter(
            "publish",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str | None,
            default=typer.Option(None, help="Publish to the store as the next version of this alias."),
        ),
        *_train_options(),
    ]
)
