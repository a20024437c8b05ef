"""The gateway's settings: one pydantic-settings class, read from ``LORAFLEET_*`` at start-up."""

from __future__ import annotations

from pydantic import Field, model_validator

from contract.settings import CommonSettings


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
    engine_port: int = Field(default=8100, description="Port of the vLLM child process (loopback only).")
    engine_start_timeout_s: float = Field(default=300.0, description="How long vLLM may take to become healthy.")
    max_lora_rank: int = Field(default=16, description="Largest LoRA rank the engine accepts (vLLM --max-lora-rank).")
    max_loras: int = Field(
        default=4,
        description="Adapters resident on the engine at once (vLLM --max-loras); size it to the adapters hot at once.",
    )
    max_model_len: int = Field(
        default=2048, description="Longest prompt + completion, in tokens (vLLM --max-model-len)."
    )
    kv_cache_gib: int = Field(default=2, description="KV cache size on the CPU engine, GiB (VLLM_CPU_KVCACHE_SPACE).")
    upstream_timeout_s: float = Field(default=600.0, description="Timeout for one request to the engine.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the state database; default sqlite under data_dir."
    )

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        problems = []
        if not 1 <= self.max_lora_rank <= 512:
            problems.append(f"max_lora_rank={self.max_lora_rank}: use 1..512")
        if self.max_loras < 1:
            problems.append(f"max_loras={self.max_loras}: use at least 1")
        if self.port == self.engine_port and self.engine_url is None:
            problems.append(f"port and engine_port are both {self.port}: give them different values")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def state_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'state.db'}"
