"""The training configuration: one typed class, one docstring per field.

``lorafleet train --help`` is generated from it, and a YAML file with the same
field names is a saved set of the same arguments (flags override the file):

    lorafleet train --config configs/orders.yaml --max-steps 20

Everything is checked before any model is loaded, and every problem is reported
at once, including the adapter kinds vLLM cannot serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention-mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Modules vLLM cannot serve as LoRA targets (it serves LoRA on linear layers only).
UNSERVABLE_TARGETS = {"embed_tokens", "lm_head", "wte", "wpe", "embed_out", "norm"}


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data
    data: Path = Field(
        description="Training data: JSONL or a JSON array of instruction, prompt/completion or chat rows."
    )
    out: Path = Field(description="Folder the adapter artifact is written to (replaced when training succeeds).")
    eval_data: Path | None = Field(default=None, description="Validation data; unset: split off --val-fraction.")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=0.9, description="Share of --data held out for eval loss.")
    schema_file: Path | None = Field(
        default=None, alias="schema", description="JSON Schema for every output (rows may carry their own)."
    )
    skip_invalid: bool = Field(default=False, description="Drop rows with errors (counted) instead of refusing.")
    task: str = Field(default="task", description="Task name recorded in the manifest, e.g. 'orders'.")
    base_model: str | None = Field(
        default=None,
        description="Base model: a directory, one provisioned under data_dir/models (e.g. gemma-3-270m) or a hub "
        "id; default: the setting.",
    )
    max_length: int = Field(default=512, ge=16, description="Longest example in tokens; longer ones are errors.")
    # adapter
    init_adapter: Path | None = Field(
        default=None,
        description="Continue training this adapter directory (its rank, alpha and targets; the flags' are unused).",
    )
    rank: int = Field(default=16, ge=1, description="LoRA rank r.")
    alpha: int = Field(
        default=32, ge=1, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: str = Field(
        default="attention",
        description="Target modules: a preset (attention, attention-mlp) or a comma-separated list of module names.",
    )
    rslora: bool = Field(default=False, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")
    dora: bool = Field(default=False, description="DoRA (refused: vLLM cannot serve it).")
    modules_to_save: str | None = Field(
        default=None, description="Fully trained modules (refused: vLLM cannot serve them)."
    )
    max_lora_rank: int = Field(
        default=16, ge=1, description="The serving engine's max_lora_rank; a larger rank is refused."
    )
    qlora: bool = Field(default=False, description="Load the base in 4-bit NF4 (bitsandbytes) and train LoRA on top.")
    # optimisation
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(default=-1, description="Stop after this many optimiser steps (> 0 overrides --epochs).")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"] = Field(
        default="adamw_torch", description="Optimiser (Hugging Face Trainer names)."
    )
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(default="cosine", description="LR schedule.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Share of steps spent warming up the LR.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(default=8, ge=1, description="Examples per device per forward pass.")
    grad_accum: int = Field(default=1, ge=1, description="Forward passes per optimiser step.")
    grad_checkpointing: bool = Field(default=False, description="Recompute activations to save memory (slower).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on GPUs and on CPUs with native bf16, else fp32."
    )
    group_by_length: bool = Field(default=True, description="Batch examples of similar length: less padding, faster.")
    packing: bool = Field(
        default=False,
        description="Pack several examples into each max_length row (no padding at all; attention stays per example).",
    )
    seed: int = Field(default=0, description="Seed for the split, data order and LoRA initialisation.")
    # evaluation and checkpoints
    eval_every: int = Field(default=0, ge=0, description="Eval loss every N steps (0: at the end only).")
    early_stopping: int = Field(default=0, ge=0, description="Stop after N evals without improvement (0: off).")
    save_every: int = Field(default=0, ge=0, description="Checkpoint every N steps for --resume (0: eval_every).")
    log_every: int = Field(default=5, ge=1, description="Log loss and speed every N steps.")

    @model_validator(mode="after")
    def _servable(self) -> TrainConfig:
        problems = []
        if self.dora:
            problems.append("dora: vLLM cannot serve DoRA adapters; train plain LoRA (drop --dora)")
        if self.modules_to_save:
            problems.append("modules_to_save: vLLM serves LoRA weights only, not fully trained modules; drop it")
        bad = sorted(set(self.target_modules()) & UNSERVABLE_TARGETS)
        if bad:
            problems.append(f"targets: vLLM cannot serve LoRA on {bad}; target linear layers (e.g. the presets)")
        if self.rank > self.max_lora_rank:
            problems.append(
                f"rank: {self.rank} exceeds the serving max_lora_rank {self.max_lora_rank}; lower --rank or raise "
                "--max-lora-rank together with the gateway's LORAFLEET_MAX_LORA_RANK"
            )
        if self.early_stopping and not self.eval_every:
            problems.append("early_stopping: needs --eval-every N to have evals to compare")
        if self.save_every and self.eval_every and self.save_every % self.eval_every:
            problems.append("save_every: must be a multiple of eval_every (the best checkpoint is kept at the end)")
        if self.eval_data is None and self.val_fraction == 0 and (self.eval_every or self.early_stopping):
            problems.append("eval_every: needs validation data (--eval-data or --val-fraction > 0)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def target_modules(self) -> list[str]:
        if self.targets in TARGET_PRESETS:
            return list(TARGET_PRESETS[self.targets])
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def checkpoint_every(self) -> int:
        return self.save_every or self.eval_every


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The config from the YAML file ``path`` (if any) with ``overrides`` on top; every problem at once."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text("utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
    values |= {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "config"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}{field}: {message}" if field != "config" else f"{where}{message}")
        raise ConfigError("invalid training config:\n  " + "\n  ".join(lines)) from exc
