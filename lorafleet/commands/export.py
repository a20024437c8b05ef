"""``lorafleet export``: merge an adapter into its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contract.settings import CommonSettings
from lorafleet.console import console, fail


def export(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (or store path) to merge.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model.")],
    merge: Annotated[bool, typer.Option(help="Merge the LoRA weights into the base model.")] = True,
) -> None:
    """Write a merged full model directory (bf16 safetensors) that vLLM serves as a base model."""
    from contract.manifest import ManifestError
    from training.export import merge as merge_adapter

    if not merge:
        raise fail("only --merge export exists: the adapter directory itself is the unmerged export")
    settings = CommonSettings()
    try:
        merge_adapter(adapter, out, settings.base_model_path())
    except (ManifestError, ValueError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"merged model written to {out}; serve it with LORAFLEET_BASE_MODEL={out}")
