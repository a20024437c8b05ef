"""Which engines a gateway routes across: ``LORAFLEET_ENGINES_FILE``, or the single-engine settings.

    engines:
      - name: local                  # a supervised child on this machine (no url)
        port: 8100
        max_loras: 4
        cpus: 0-3                    # its cores (or gpus: "0"); unset: all of them
      - name: gpu-a
        url: http://10.0.0.5:8000    # an engine running elsewhere
        key_env: GPU_A_KEY           # its API key, from this environment variable (or `key:`)
        max_loras: 8
        store_prefix: /mnt/adapters  # where that engine mounts the adapter store
      - name: pool
        url: http://vllm-headless:8000  # a name with several addresses: one engine each
        discover: dns
      - name: gemma
        port: 8101
        base: gemma-3-270m           # another base model: its adapters go only here
      - name: orders-fast
        port: 8102
        base: /models/orders-3-merged  # `lorafleet export --merge` of orders@3 ...
        merged: orders@3               # ... which gets its requests first, at base-model speed

An engine serves the gateway's base model (``LORAFLEET_BASE_MODEL``) unless
``base`` names another (in the same forms: a directory, a model under
``data_dir/models``, a hub id); the gateway checks each one's ``/v1/models``
for it, and routes an adapter only to engines serving the base it was trained
on. Without the file, the gateway has one engine made from
``LORAFLEET_ENGINE_URL`` / ``LORAFLEET_ENGINE_PORT`` / ``LORAFLEET_MAX_LORAS``,
as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from serving.config import GatewaySettings

ENGINE_NAME = r"^[a-z0-9][a-z0-9-]{0,30}$"


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ENGINE_NAME, description="Names the engine in routing, metrics and logs.")
    url: str | None = Field(default=None, description="A running vLLM server; unset: a supervised child here.")
    port: int | None = Field(default=None, ge=1, le=65535, description="The supervised child's port (loopback).")
    key: SecretStr | None = Field(default=None, description="The engine's API key (an external engine).")
    key_env: str | None = Field(default=None, description="An environment variable holding that key.")
    max_loras: int = Field(default=4, ge=1, description="Adapters resident on it at once (vLLM --max-loras).")
    store_prefix: str | None = Field(
        default=None, description="Where this engine mounts the adapter store, when not at the gateway's path."
    )
    extra_args: list[str] = Field(default_factory=list, description="More vLLM arguments for a supervised child.")
    cpus: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$",
        description="A supervised child's CPU cores, e.g. '0-3' (vLLM-CPU's VLLM_CPU_OMP_THREADS_BIND): engines "
        "sharing a machine each get their own cores instead of fighting over all of them.",
    )
    gpus: str | None = Field(
        default=None, pattern=r"^[0-9]+(,[0-9]+)*$", description="A supervised child's GPUs (CUDA_VISIBLE_DEVICES)."
    )
    base: str | None = Field(
        default=None, description="The base model it serves (as LORAFLEET_BASE_MODEL); unset: the gateway's."
    )
    merged: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}@[1-9][0-9]*$",
        description="The adapter version (alias@N) its base is merged from (`lorafleet export --merge`): requests "
        "to that version come here first; 'base' is then the merged model's directory.",
    )
    discover: Literal["dns"] | None = Field(
        default=None,
        description="dns: the url's host names several engines (a Kubernetes headless Service): one engine per "
        "address, re-resolved every LORAFLEET_DISCOVERY_S.",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if self.url is None and self.port is None:
            raise ValueError("give either 'url' (an engine running elsewhere) or 'port' (a supervised child)")
        if self.url is not None and (self.port is not None or self.extra_args or self.cpus or self.gpus):
            raise ValueError(
                "'port', 'extra_args', 'cpus' and 'gpus' are for a supervised child, not an engine at 'url'"
            )
        if self.discover is not None and self.url is None:
            raise ValueError("'discover: dns' needs the 'url' whose host to resolve")
        if self.key is not None and self.key_env is not None:
            raise ValueError("give 'key' or 'key_env', not both")
        if self.merged is not None and self.base is None:
            raise ValueError(f"'merged: {self.merged}' needs 'base': the directory `lorafleet export --merge` wrote")
        return self

    def api_key(self) -> SecretStr | None:
        if self.key_env is None:
            return self.key
        value = os.environ.get(self.key_env)
        if not value:
            raise ValueError(f"engine {self.name}: the environment variable {self.key_env} is not set")
        return SecretStr(value)


class EnginesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engines: list[EngineSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> EnginesFile:
        names = [e.name for e in self.engines]
        ports = [e.port for e in self.engines if e.port is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be unique: {names}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"supervised engines need different ports: {ports}")
        return self


class EnginesFileError(ValueError):
    """The engines file cannot be used; the message names the file, the engine and the field."""


def engine_specs(settings: GatewaySettings) -> list[EngineSpec]:
    """The engines to route across (see the module's docstring)."""
    if settings.engines_file is None:
        return [
            EngineSpec(
                name="engine",
                url=settings.engine_url,
                port=None if settings.engine_url else settings.engine_port,
                key=settings.engine_key,
                max_loras=settings.max_loras,
            )
        ]
    return load_engines_file(settings.engines_file)


def load_engines_file(path: Path) -> list[EngineSpec]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EnginesFileError(f"{path}: cannot be read as YAML ({exc})") from exc
    try:
        parsed = EnginesFile.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            if error["loc"][:1] == ("engines",) and len(error["loc"]) > 1 and isinstance(document, dict):
                index = error["loc"][1]
                engines = document.get("engines") or []
                if isinstance(index, int) and index < len(engines) and isinstance(engines[index], dict):
                    where = f"engine {engines[index].get('name', index)!r}: " + ".".join(
                        str(p) for p in error["loc"][2:]
                    )
            problems.append(f"{where}: {error['msg']}")
        raise EnginesFileError(f"{path}: " + "; ".join(problems)) from exc
    for spec in parsed.engines:
        try:
            spec.api_key()
        except ValueError as exc:
            raise EnginesFileError(f"{path}: {exc}") from exc
    return parsed.engines
