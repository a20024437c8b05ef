"""The gateway's settings: one pydantic-settings class, read from ``LORAFLEET_*`` at start-up."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from contract.settings import CommonSettings

# Where a running gateway says where it listens (the CLI's admin client reads it).
GATEWAY_FILE = "gateway.json"


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, description="Port the gateway listens on.")
    engine_url: str | None = Field(
        default=None,
        description=(
            "URL of an already running vLLM OpenAI server (started with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Unset: the gateway starts and supervises its own."
        ),
    )
    engine_key: SecretStr | None = Field(
        default=None,
        description=(
            "API key of the engine at engine_url (vLLM --api-key). The supervised child gets a fresh random one "
            "on every start instead."
        ),
    )
    engine_port: int = Field(default=8100, description="Port of the vLLM child process (loopback only).")
    engines_file: Path | None = Field(
        default=None,
        description="A YAML file listing several engines to route across (docs/operations.md); unset: one engine.",
    )
    route_epsilon: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="Bounded-load slack: an engine above (1 + this) × the mean load "
        "takes no more of an adapter's requests while another engine can.",
    )
    route_policy: Literal["affinity", "round_robin", "random"] = Field(
        default="affinity",
        description="How requests are spread over engines: affinity with bounded load (serving.engines.router); "
        "round_robin and random ignore where adapters are, and exist as baselines for `make bench-fleet`.",
    )
    engine_poll_s: float = Field(default=1.0, gt=0, description="How often each engine's load is read (metrics).")
    discovery_s: float = Field(
        default=30.0, gt=0, description="How often an engine entry with 'discover: dns' has its host resolved again."
    )
    engine_start_timeout_s: float = Field(default=300.0, description="How long vLLM may take to become healthy.")
    max_loras: int = Field(
        default=4,
        description="Adapters resident on the engine at once (vLLM --max-loras); size it to the adapters hot at once.",
    )
    max_model_len: int = Field(
        default=2048, description="Longest prompt + completion, in tokens (vLLM --max-model-len)."
    )
    engine_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of the vLLM child: the gateway stays responsive when vLLM fills every core.",
    )
    kv_cache_gib: int = Field(default=2, description="KV cache size on the CPU engine, GiB (VLLM_CPU_KVCACHE_SPACE).")
    state_cache_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "How long the gateway keeps API keys, alias policies and each alias's serving version in memory. Admin "
            "API changes apply at once; changes written to the database or the store by another process apply "
            "within this. 0: read them on every request."
        ),
    )
    state_outage_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "While the state database does not answer, how long past state_cache_s the gateway keeps serving the "
            "keys, policies and serving versions it has cached (new keys get 503 state_unavailable meanwhile)."
        ),
    )
    shutdown_grace_s: int = Field(
        default=30, description="On Ctrl-C/SIGTERM, how long in-flight requests may take to finish before being cut."
    )
    upstream_timeout_s: float = Field(default=600.0, description="Timeout for one request to the engine.")
    admin_key: SecretStr | None = Field(
        default=None, description="Credential of the admin API (tenants, keys, adapters); required unless dev_mode."
    )
    dev_mode: bool = Field(
        default=False, description="Development mode: the admin API needs no key (only on a loopback host)."
    )
    max_body_bytes: int = Field(default=1 << 20, description="Largest request body accepted; larger ones get 413.")
    max_prompts: int = Field(default=16, ge=1, description="Prompts in one /v1/completions request (a list).")
    max_sequences: int = Field(
        default=16, ge=1, description="Sequences in one request: n × prompts (each is a generation the engine runs)."
    )
    max_upload_bytes: int = Field(
        default=256 << 20, description="Largest adapter archive the admin API accepts (packed and unpacked)."
    )
    max_answer_entries: int = Field(
        default=131_072,
        ge=1024,
        description=(
            "Largest whole (non-streamed) answer: sequences × max_tokens (the model's length when unset) × (1 + "
            "top_logprobs); larger ones get 400 answer_too_large (streams are not bounded by it)."
        ),
    )
    schema_check_threads: int = Field(
        default=4, ge=1, le=64, description="Threads that check clients' JSON Schemas (one per tenant at a time)."
    )
    max_file_bytes: int = Field(
        default=512 << 20, ge=1024, description="Largest file a tenant may upload (POST /v1/files); larger gets 413."
    )
    file_quota_bytes: int = Field(
        default=2 << 30, ge=1024, description="All of one tenant's files together; past it uploads get 429."
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Time a client has to send a request's headers; then the connection closes."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Time a client has to send a request's whole body; then 408."
    )
    upload_timeout_s: float = Field(
        default=600.0, gt=0, description="Time an admin has to send an adapter archive (after its key is checked)."
    )
    metrics_key: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token Prometheus must send to read /metrics; required when the gateway listens beyond loopback, "
            "optional (open metrics) on a loopback host."
        ),
    )
    metrics_tenant_label: bool = Field(
        default=False, description="Export lorafleet_tenant_requests_total with a tenant label (capped, see below)."
    )
    metrics_max_tenants: int = Field(
        default=20, description="Tenants named in that label; every later one counts as 'other'."
    )
    log_content: bool = Field(
        default=False, description="Put prompts and outputs in the access log (debugging only: they may be private)."
    )
    redis_url: str | None = Field(
        default=None,
        description=(
            "Redis (redis://HOST:6379/0) where every gateway replica counts each tenant's requests and tokens per "
            "minute and requests in flight together. Unset: each replica counts its own (N replicas admit up to "
            "N × a limit)."
        ),
    )
    redis_timeout_s: float = Field(
        default=0.5, gt=0, le=10, description="Longest wait for Redis on a request before it counts as unreachable."
    )
    redis_fail_open: bool = Field(
        default=False,
        description=(
            "With Redis configured and unreachable: false (default) refuses requests of limited tenants with 503 "
            "limits_unavailable; true admits them under this replica's own counts until Redis answers again."
        ),
    )
    canary_poll_s: float = Field(default=1.0, description="How often running canaries are checked for a decision.")
    import_root: Path | None = Field(
        default=None,
        description="Folder the admin API may publish adapter directories from (default: data_dir/runs).",
    )

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        problems = []
        if not 1 <= self.max_lora_rank <= 512:
            problems.append(f"max_lora_rank={self.max_lora_rank}: use 1..512")
        if self.max_loras < 1:
            problems.append(f"max_loras={self.max_loras}: use at least 1")
        if self.admin_key is None and not self.dev_mode:
            problems.append(
                "no admin key: set LORAFLEET_ADMIN_KEY (e.g. `openssl rand -hex 32`), "
                "or LORAFLEET_DEV_MODE=1 on a loopback host for development"
            )
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < 16:
            problems.append("admin_key: use at least 16 characters")
        if self.dev_mode and self.admin_key is None and not _loopback(self.host):
            problems.append(f"dev_mode without an admin key listens only on loopback, not {self.host}")
        if self.metrics_key is None and not _loopback(self.host):
            problems.append(
                f"no metrics key while listening on {self.host}: set LORAFLEET_METRICS_KEY (Prometheus sends it "
                "as a bearer token), or listen on a loopback host"
            )
        if self.max_body_bytes < 1024:
            problems.append(f"max_body_bytes={self.max_body_bytes}: use at least 1024")
        if self.port == self.engine_port and self.engine_url is None:
            problems.append(f"port and engine_port are both {self.port}: give them different values")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_url(settings: GatewaySettings) -> str:
    """Where a process on this host reaches the gateway (a wildcard listen address is reached on loopback)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def import_root_of(settings: GatewaySettings) -> Path:
    return (settings.import_root or settings.data_dir / "runs").resolve()
