"""Train a LoRA adapter on instruction → output examples and write the adapter artifact.

    lorafleet train --data data/orders/train.jsonl --schema data/orders/schema.json \\
        --task orders --out var/runs/orders --publish orders

Reads JSONL rows ``{"instruction", "input"?, "output"}``, renders each prompt with
the base model's chat template (``contract.prompt``, the same rendering the
gateway serves), and fine-tunes LoRA weights with TRL's ``SFTTrainer``: loss on
the completion tokens only, with the end-of-turn token appended and learned so
the adapter knows when to stop. Writes ``adapter_model.safetensors``,
``adapter_config.json`` and the ``lorafleet.json`` manifest into ``--out``
(atomically: a crash leaves no half adapter), and with ``--publish ALIAS`` adds
it to the adapter store as the alias's next version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contract.basemodel import identify
from contract.manifest import AdapterManifest, BaseModelRef, DataRef, LoraSpec, PromptFormat
from contract.prompt import example_messages, render

TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention-mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class DataError(ValueError):
    """The training data is unusable; the message lists every problem with file, line and field."""


@dataclass
class TrainConfig:
    data: Path
    """JSONL file of ``{"instruction", "input"?, "output"}`` rows."""
    out: Path
    """Directory the adapter artifact is written to (replaced if it exists)."""
    base_model: str
    """Local Hugging Face model directory (or hub id) to adapt."""
    task: str = "task"
    """Name of the task, recorded in the manifest."""
    schema: Path | None = None
    """JSON Schema every output must match; recorded in the manifest for serving."""
    rank: int = 16
    """LoRA rank r (at most the gateway's ``max_lora_rank``)."""
    alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: str = "attention"
    """Target-module preset: ``attention`` or ``attention-mlp``."""
    epochs: float = 1.0
    """Passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimiser steps (overrides ``epochs`` when > 0)."""
    learning_rate: float = 2e-4
    """Peak learning rate (cosine schedule with warmup)."""
    batch_size: int = 8
    """Examples per optimiser step."""
    max_length: int = 256
    """Maximum tokens per example (prompt + completion)."""
    seed: int = 0
    """Seed for data order and LoRA initialisation."""
    log_every: int = 5
    """Log the training loss every N steps."""


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read instruction/output JSONL, reporting every bad line at once."""
    rows, problems = [], []
    for lineno, line in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{lineno}: not a JSON object ({exc.msg}); fix the line or remove it")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            continue
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                problems.append(f"{path}:{lineno}: field '{key}' is missing or empty; give it a non-empty string")
        rows.append(row)
    if not rows and not problems:
        problems.append(f"{path}: no examples; add JSONL rows with 'instruction' and 'output'")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the training data:\n  " + "\n  ".join(problems))
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_trainer(cfg: TrainConfig, output_dir: Path) -> tuple[Any, PromptFormat, list[dict[str, Any]], bool]:
    """The ``SFTTrainer`` for ``cfg``, with its tokenized dataset; returns (trainer, prompt format, rows, bf16)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if cfg.targets not in TARGET_PRESETS:
        raise ValueError(f"--targets must be one of {sorted(TARGET_PRESETS)}, not {cfg.targets!r}")
    rows = load_rows(cfg.data)

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if not tokenizer.chat_template:
        raise ValueError(f"{cfg.base_model}: the tokenizer has no chat template; use an instruct model")
    prompt_format = PromptFormat(
        chat_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    # Prompts are rendered by the contract, not by TRL, so training sees exactly
    # the string the gateway will have vLLM render from the manifest.
    dataset = Dataset.from_list(
        [{"prompt": render_prompt(prompt_format, row), "completion": row["output"]} for row in rows]
    )

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=TARGET_PRESETS[cfg.targets],
        task_type="CAUSAL_LM",
    )
    # bf16 autocast doubles CPU throughput where the CPU has native bf16 (AVX-512 BF16, AMX).
    use_bf16 = torch.cuda.is_available() or _cpu_has_bf16()
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=cfg.log_every,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        max_length=cfg.max_length,
        # Loss on the completion only; TRL appends the EOS token (<|im_end|> for
        # SmolLM2, which is also its pad token) to each completion and keeps it
        # in the labels, so the adapter learns to stop.
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Recomputing activations saves memory a 135M model does not need and costs ~1.5x time.
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    return trainer, prompt_format, rows, use_bf16


def render_prompt(prompt_format: PromptFormat, row: dict[str, Any]) -> str:
    return render(
        prompt_format.chat_template,
        example_messages(row),
        add_generation_prompt=True,
        bos_token=prompt_format.bos_token,
        eos_token=prompt_format.eos_token,
    )


def train(cfg: TrainConfig) -> AdapterManifest:
    """Train, then write the adapter artifact to ``cfg.out`` in one rename (nothing is left on failure)."""
    staging = cfg.out.with_name(cfg.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = _train_into(cfg, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(cfg.out, ignore_errors=True)
    staging.rename(cfg.out)
    return manifest


def _train_into(cfg: TrainConfig, staging: Path) -> AdapterManifest:
    schema = json.loads(Path(cfg.schema).read_text("utf-8")) if cfg.schema else None
    trainer, prompt_format, rows, use_bf16 = build_trainer(cfg, staging / "trainer")
    started = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - started

    trainer.model.save_pretrained(str(staging), safe_serialization=True)
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    (staging / "README.md").unlink(missing_ok=True)  # peft's model-card stub; the manifest says it all
    base = identify(cfg.base_model)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    manifest = AdapterManifest(
        task=cfg.task,
        base_model=BaseModelRef(name=base.name, sha256=base.sha256),
        prompt_format=prompt_format,
        output_schema=schema,
        data=DataRef(path=str(cfg.data), sha256=_sha256(cfg.data), examples=len(rows)),
        lora=LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=lora_targets(cfg)),
        hyperparameters={k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "schema", "base_model")}
        | {"bf16": use_bf16, "steps": result.global_step},
        metrics={
            "train_loss_first": float(losses[0]) if losses else float("nan"),
            "train_loss_last": float(losses[-1]) if losses else float("nan"),
            "train_seconds": round(elapsed, 2),
        },
    )
    manifest.write(staging)
    return manifest


def lora_targets(cfg: TrainConfig) -> list[str]:
    return list(TARGET_PRESETS[cfg.targets])


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
