"""Where lorafleet keeps its files, and which base model it builds on.

Read from the environment (``LORAFLEET_*``) or a ``.env`` file; every command
and the gateway share these settings.

Layout under ``data_dir``::

    models/<name>/          base models converted to safetensors
    adapters/<alias>/<n>/   the adapter store (see ``contract.store``)
    files/<tenant>/<id>     files tenants upload (fine-tuning data; ``files_dir``)
    jobs/<job id>/          fine-tuning jobs' work: checkpoints, the adapter before it is published (``jobs_dir``)
    cache/                  downloaded wheels and other re-creatable files
    state.db                the gateway's control-plane state (SQLite)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"

# llguidance's JSON compile options for json.dumps' default layout: '{"a": 1, "b": [2, 3]}' and nothing else.
SPACED_JSON = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def laid_out(schema: dict[str, Any], layout: dict[str, Any] | None) -> dict[str, Any]:
    """``schema`` as an engine gets it: with ``layout`` as its ``x-guidance`` options, and never a client's own
    (llguidance would take them over the engine's settings: whitespace, lenient keywords)."""
    if layout is not None:
        return {**schema, "x-guidance": layout}
    return {k: v for k, v in schema.items() if k != "x-guidance"} if "x-guidance" in schema else schema


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path("var"),
        description="Root folder for base models, the adapter store, caches and state.",
    )
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description=(
            "The base model: a local Hugging Face model directory, the name of a model "
            "provisioned under data_dir/models (the default is pulled by `lorafleet model "
            "pull`), or a hub id where a hub is reachable."
        ),
    )

    max_lora_rank: int = Field(
        default=16, description="Largest LoRA rank the serving engine accepts (vLLM --max-lora-rank)."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the state database; default sqlite under data_dir."
    )

    files_dir: Path | None = Field(
        default=None,
        description=(
            "Where tenants' files (fine-tuning data) are kept; default data_dir/files. With several gateways or "
            "workers, a folder every one of them shares (the Helm chart puts it on the adapter store's volume)."
        ),
    )
    jobs_dir: Path | None = Field(
        default=None,
        description=(
            "Where fine-tuning jobs keep their checkpoints and unpublished adapters; default data_dir/jobs. Shared "
            "by every worker (a job resumes on whichever worker takes it after its lease ran out)."
        ),
    )

    json_backend: Literal["auto", "guidance", "xgrammar"] = Field(
        default="guidance",
        description=(
            "vLLM's structured-outputs backend for enforced JSON (every engine this project starts, and the "
            "offline evaluation's): guidance (llguidance: its refusals name the keywords it cannot enforce, which "
            "the gateway then serves in validate mode; the only one that can hold JSON to spaced separators) or "
            "xgrammar; auto lets vLLM choose per request (xgrammar, else guidance) and leaves any whitespace."
        ),
    )
    json_whitespace: Literal["spaced", "compact", "any"] = Field(
        default="spaced",
        description=(
            "Whitespace enforced JSON may hold between tokens. spaced: exactly json.dumps' separators (', ' and "
            "': ') and no other (llguidance's x-guidance options, added to every enforced schema; needs "
            "backend guidance): the layout every training row here is written in, and no room to fill an "
            "answer with spaces and newlines until max_tokens. compact: none at all (vLLM's "
            "disable_any_whitespace; guidance or xgrammar); holds an adapter trained on spaced JSON off its own "
            "tokens. any: vLLM's default, where a small model can loop on whitespace (docs/benchmarks.md, "
            "enforced JSON)."
        ),
    )

    lora_ops: Literal["grouped", "vllm"] = Field(
        default="grouped",
        description=(
            "LoRA shrink/expand in CPU engines: grouped (lorafleet's vLLM plugin, lorafleet_vllm: one matmul per "
            "adapter present in a batch, verified against one vLLM version and standing aside on another) or "
            "vllm (vLLM's own torch ops, which gather a copy of the adapter weights for every token)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _no_removed_settings(cls, data: Any) -> Any:
        if "LORAFLEET_JSON_COMPACT" in os.environ:
            raise ValueError(
                "LORAFLEET_JSON_COMPACT was replaced by LORAFLEET_JSON_WHITESPACE: set it to compact (with "
                "LORAFLEET_JSON_BACKEND=guidance or xgrammar), spaced (the default) or any, and unset "
                "LORAFLEET_JSON_COMPACT"
            )
        return data

    @model_validator(mode="after")
    def _whitespace_needs_a_backend(self) -> Self:
        if self.json_whitespace == "spaced" and self.json_backend != "guidance":
            raise ValueError(
                f"LORAFLEET_JSON_WHITESPACE=spaced needs LORAFLEET_JSON_BACKEND=guidance (only llguidance takes "
                f"separators from the schema), not {self.json_backend}; or set LORAFLEET_JSON_WHITESPACE=compact "
                "(guidance or xgrammar) or any"
            )
        if self.json_whitespace == "compact" and self.json_backend == "auto":
            raise ValueError(
                "LORAFLEET_JSON_WHITESPACE=compact needs LORAFLEET_JSON_BACKEND=guidance or xgrammar (vLLM applies "
                "disable_any_whitespace only with a named backend); or set LORAFLEET_JSON_WHITESPACE=any"
            )
        return self

    def structured_outputs(self) -> dict[str, Any]:
        """vLLM's structured-outputs config for every engine (``--structured-outputs-config``)."""
        return {"backend": self.json_backend, "disable_any_whitespace": self.json_whitespace == "compact"}

    @property
    def json_layout(self) -> dict[str, Any] | None:
        """llguidance's layout options every enforced schema gets (``x-guidance``), or ``None``."""
        return dict(SPACED_JSON) if self.json_whitespace == "spaced" else None

    @property
    def files_root(self) -> Path:
        return self.files_dir or self.data_dir / "files"

    @property
    def jobs_root(self) -> Path:
        return self.jobs_dir or self.data_dir / "jobs"

    @property
    def state_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'state.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def base_model_path(self) -> str:
        """The local directory of the base model, or the hub id if it is not local."""
        return self.model_path(self.base_model)

    def model_path(self, model: str) -> str:
        """Where ``model`` is: a local directory as given, one provisioned under ``data_dir/models``, else a hub id."""
        as_path = Path(model).expanduser()
        if as_path.is_dir():
            return str(as_path)
        provisioned = self.models_dir / model
        if provisioned.is_dir() or model == DEFAULT_BASE_MODEL:
            return str(provisioned)
        return model
