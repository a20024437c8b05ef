"""The adapter manifest: what an adapter directory holds and how it was made.

An adapter directory is::

    adapter_model.safetensors   PEFT LoRA weights (safetensors only)
    adapter_config.json         PEFT config
    lorafleet.json              this manifest

Training writes it, evaluation adds its verdict, serving reads it to check the
adapter fits the served base model and to render prompts the way training did.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

MANIFEST_FILE = "lorafleet.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """An adapter directory is incomplete or its manifest is invalid."""


class PromptFormat(BaseModel):
    """How a request becomes the prompt string the adapter was trained on."""

    type: Literal["chat_template"] = "chat_template"
    chat_template: str = Field(description="The Jinja chat template, verbatim from the base tokenizer.")
    bos_token: str = ""
    eos_token: str = ""
    tools_format: str | None = Field(
        default=None, description="How tools are rendered into the prompt (contract.tools), if trained with tools."
    )


class BaseModelRef(BaseModel):
    name: str
    sha256: str = Field(description="sha256 of the base weights; empty for a hub id.")


class DataRef(BaseModel):
    path: str
    sha256: str
    examples: int


class LoraSpec(BaseModel):
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]


class AdapterManifest(BaseModel):
    manifest_version: int = MANIFEST_VERSION
    task: str = Field(description="The task the adapter was trained for, e.g. 'orders'.")
    base_model: BaseModelRef
    prompt_format: PromptFormat
    output_schema: dict[str, Any] | None = None
    data: DataRef
    lora: LoraSpec
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    split: dict[str, Any] = Field(default_factory=dict, description="How train/validation were formed, and sizes.")
    metrics: dict[str, float | None] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def base_mismatch(self, name: str, sha256: str) -> str | None:
        """Why this adapter does not fit the base model ``name``/``sha256``, or ``None`` if it does.

        An empty checksum on either side (a hub id) cannot be compared and is taken as a fit.
        """
        ours = self.base_model
        if not (ours.sha256 and sha256) or ours.sha256 == sha256:
            return None
        return f"trained on {ours.name} ({ours.sha256[:12]}), not the base {name} ({sha256[:12]})"

    def write(self, adapter_dir: Path) -> None:
        path = Path(adapter_dir) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", "utf-8")
        tmp.replace(path)


def read_manifest(adapter_dir: Path) -> AdapterManifest:
    """Read and check an adapter directory; raises ``ManifestError`` listing every problem."""
    adapter_dir = Path(adapter_dir)
    problems = []
    if not adapter_dir.is_dir():
        raise ManifestError(f"{adapter_dir}: not a directory")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        hint = (
            " (pickled .bin weights are refused: save with safe_serialization)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        problems.append(f"{adapter_dir / WEIGHTS_FILE}: missing{hint}")
    if not (adapter_dir / CONFIG_FILE).is_file():
        problems.append(f"{adapter_dir / CONFIG_FILE}: missing")
    manifest_path = adapter_dir / MANIFEST_FILE
    manifest = None
    if not manifest_path.is_file():
        problems.append(f"{manifest_path}: missing (train with `lorafleet train` to write one)")
    else:
        try:
            manifest = AdapterManifest.model_validate_json(manifest_path.read_text("utf-8"))
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]) or "(root)"
                problems.append(f"{manifest_path}: field {field}: {err['msg']}")
    if problems or manifest is None:
        raise ManifestError("invalid adapter directory:\n  " + "\n  ".join(problems))
    return manifest


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / CONFIG_FILE).read_text("utf-8"))
