"""Train a LoRA (or QLoRA) adapter on JSON-output examples and write the adapter artifact.

    lorafleet train --data data/orders/train.jsonl --schema data/orders/schema.json \\
        --task orders --out var/runs/orders --max-steps 40 --learning-rate 1e-3 --publish orders
    lorafleet train --config configs/orders.yaml

1. Check every row (``contract.examples``): refuse on errors unless ``--skip-invalid``.
2. Split train/validation by seed (or take ``--eval-data``).
3. Render each prompt with the base model's chat template through
   ``contract.prompt``: the exact string the gateway will have vLLM render.
4. Fine-tune with TRL's ``SFTTrainer``: loss on the completion only, the
   end-of-turn token appended and learned (SmolLM2's pad token is its EOS; TRL
   masks padding by position, not by token id, so the EOS stays in the labels).
5. Eval loss every N steps, early stopping, the best checkpoint kept;
   checkpoints every N steps for ``--resume``.
6. Write ``adapter_model.safetensors`` (lora_A/lora_B only),
   ``adapter_config.json``, the ``lorafleet.json`` manifest, ``metrics.jsonl``
   and ``loss.png`` to ``<out>.partial`` and rename it to ``<out>`` at the end:
   a killed or failed run never leaves a half adapter where a finished one is
   expected (and ``--resume`` picks ``<out>.partial`` up again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from contract.basemodel import identify
from contract.examples import CheckReport, DataError, Example, check
from contract.judge import check_schema
from contract.manifest import AdapterManifest, BaseModelRef, DataRef, LoraSpec, PromptFormat
from contract.prompt import adds_bos, render, with_tools
from contract.tools import TOOLS_FORMAT
from training.checkpoints import CHECKPOINTS, last_checkpoint, staging_of
from training.config import TrainConfig
from training.progress import Announce, MetricsLog, RichProgress, StopOnSignal


@dataclass
class Prepared:
    """Everything decided before the first step: what the run will train on."""

    trainer: Any
    prompt_format: PromptFormat
    train_examples: list[Example]
    eval_examples: list[Example]
    reports: list[CheckReport]
    precision: str
    split: dict[str, Any]


def prompt_format_of(tokenizer: Any) -> PromptFormat:
    """The prompt format a tokenizer renders: its chat template and special tokens."""
    return PromptFormat(
        chat_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )


def render_prompt(prompt_format: PromptFormat, example: Example) -> str:
    return render(
        prompt_format.chat_template,
        with_tools(example.messages, example.tools),
        add_generation_prompt=True,
        bos_token=prompt_format.bos_token,
        eos_token=prompt_format.eos_token,
    )


def load_schema(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    schema = json.loads(Path(path).read_text("utf-8"))
    check_schema(schema)
    return schema


def check_data(cfg: TrainConfig, tokenizer: Any, prompt_format: PromptFormat) -> list[CheckReport]:
    """Check the training (and validation) files; raise ``DataError`` on errors unless skipping them."""
    schema = load_schema(cfg.schema_file)

    def token_length(example: Example) -> int:
        text = render_prompt(prompt_format, example) + example.completion + prompt_format.eos_token
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    reports = []
    for path in [cfg.data] + ([cfg.eval_data] if cfg.eval_data else []):
        report = check(path, schema=schema, token_length=token_length, max_length=cfg.max_length)
        if report.errors and not cfg.skip_invalid:
            raise DataError(report)
        reports.append(report)
    return reports


def _precision(cfg: TrainConfig) -> str:
    import torch

    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_bf16() else "fp32"


def prepare(cfg: TrainConfig, base_model: str, staging: Path, callbacks: list[Any] | None = None) -> Prepared:
    """Check the data, build the datasets, the model and the ``SFTTrainer`` (``callbacks`` added to its own)."""
    import datasets
    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    hf_logging.disable_progress_bar()  # the weights' loading bar; RichProgress shows the training itself

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if not tokenizer.chat_template:
        raise ValueError(f"{base_model}: the tokenizer has no chat template; use an instruct model")
    prompt_format = prompt_format_of(tokenizer)
    reports = check_data(cfg, tokenizer, prompt_format)
    if any(e.tools for e in reports[0].examples):
        prompt_format.tools_format = TOOLS_FORMAT
    train_examples, eval_examples, split = split_examples(cfg, reports)
    to_dataset = _dataset_maker(prompt_format, adds_bos(tokenizer))

    precision = _precision(cfg)
    model, lora = load_model(cfg, base_model)
    callbacks = [MetricsLog(staging / "metrics.jsonl"), RichProgress(), *(callbacks or [])]
    if cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping))
    datasets.disable_progress_bars()
    trainer_cls = SFTTrainer if torch.cuda.is_available() else _plain_loss_trainer(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=trainer_config(cfg, staging, precision, evaluating=bool(eval_examples)),
        train_dataset=to_dataset(train_examples),
        eval_dataset=to_dataset(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress shows the same, on one line
    return Prepared(trainer, prompt_format, train_examples, eval_examples, reports, precision, split)


def split_examples(cfg: TrainConfig, reports: list[CheckReport]) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """The training and validation examples, and how they were split (recorded in the manifest): the
    ``eval_data`` file, else a seeded ``val_fraction`` of the training file (at least 10 examples), else none."""
    from datasets import Dataset

    train_examples = reports[0].examples
    if cfg.eval_data:
        eval_examples = reports[1].examples
        split: dict[str, Any] = {"source": "file", "eval_data": str(cfg.eval_data)}
    elif cfg.val_fraction > 0 and len(train_examples) >= 10:
        order = Dataset.from_dict({"i": list(range(len(train_examples)))}).train_test_split(
            test_size=cfg.val_fraction, seed=cfg.seed
        )
        eval_examples = [train_examples[i] for i in sorted(order["test"]["i"])]
        train_examples = [train_examples[i] for i in sorted(order["train"]["i"])]
        split = {"source": "split", "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    else:
        eval_examples, split = [], {"source": "none"}
    return train_examples, eval_examples, split | {"train": len(train_examples), "validation": len(eval_examples)}


def _dataset_maker(prompt_format: PromptFormat, leave_bos: bool) -> Callable[[list[Example]], Any]:
    """Examples to TRL's prompt/completion dataset, each prompt rendered as served.

    TRL tokenizes the prompt text with the tokenizer's special tokens; the server tokenizes the rendered chat
    prompt without them. A template that writes <bos> itself (Gemma's) for a tokenizer that adds one would get
    two here and one when served: the template's is left to the tokenizer instead, so both have exactly one.
    """
    from datasets import Dataset

    bos = prompt_format.bos_token

    def as_trained(prompt: str) -> str:
        return prompt[len(bos) :] if leave_bos and prompt.startswith(bos) else prompt

    def to_dataset(examples: list[Example]) -> Dataset:
        return Dataset.from_list(
            [{"prompt": as_trained(render_prompt(prompt_format, e)), "completion": e.completion} for e in examples]
        )

    return to_dataset


def load_model(cfg: TrainConfig, base_model: str) -> tuple[Any, Any]:
    """The base model (fp32, or 4-bit for QLoRA), seeded, and the LoRA config PEFT wraps it with (or, continuing
    ``init_adapter``, the model with that adapter on, trainable, and no config)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model_kwargs: dict[str, Any] = _qlora_kwargs(torch) if cfg.qlora else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)
    if cfg.init_adapter is not None:  # training continues from an adapter: its own LoRA settings
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True), None
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules(),
        use_rslora=cfg.rslora,
        task_type="CAUSAL_LM",
    )
    return model, lora


def trainer_config(cfg: TrainConfig, staging: Path, precision: str, *, evaluating: bool) -> Any:
    """TRL's ``SFTConfig`` from the training config: one keyword per setting, completion-only loss."""
    import torch
    from trl import SFTConfig

    every = cfg.checkpoint_every
    return SFTConfig(
        output_dir=str(staging / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        logging_steps=cfg.log_every,
        eval_strategy="steps" if evaluating and cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        save_total_limit=2,
        load_best_model_at_end=bool(evaluating and cfg.eval_every and every),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        max_length=cfg.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        packing=cfg.packing,
        packing_strategy="bfd",
        gradient_checkpointing=cfg.grad_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
    )


def _plain_loss_trainer(sft_trainer: type) -> type:
    """``SFTTrainer`` with the loss computed from full logits, the documented way to change its loss.

    TRL computes the loss through a fused, tiled LM head that never materialises
    the logits: the right trade on a GPU, but on the CPU it costs ~30% of the
    step (measured: 279 vs 372 tokens/s on SmolLM2-135M, batch 8). The labels are
    the same (prompt and padding masked), so the loss is too; only TRL's entropy
    and token-accuracy metrics are not logged.
    """
    from transformers import Trainer

    class PlainLossSFTTrainer(sft_trainer):
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def _qlora_kwargs(torch: Any) -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError("--qlora needs bitsandbytes: pip install 'lorafleet[gpu]' (or bitsandbytes)") from exc
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        warnings.warn(
            "QLoRA on the CPU works but is much slower than LoRA; use it on a GPU (on a CPU, bitsandbytes' "
            "4-bit kernel comes from the optional `kernels` package)",
            stacklevel=3,
        )
    compute = torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return {"quantization_config": quant, "dtype": compute}


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``--resume`` continues from it."""

    def __init__(self, step: int, staging: Path) -> None:
        super().__init__(f"stopped at step {step} (checkpoint in {staging})")
        self.step, self.staging = step, staging


def train(
    cfg: TrainConfig,
    base_model: str,
    *,
    resume: bool = False,
    announce: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
) -> AdapterManifest:
    """Train, then move the finished artifact to ``cfg.out`` in one rename.

    ``resume``: continue from the last checkpoint in ``<out>.partial`` (left by a killed or stopped run).
    ``announce``: called every few seconds with the run's status (step, ETA, ...).
    ``callbacks``: more ``TrainerCallback``s (a fine-tuning job's reporter).
    Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and raises ``Interrupted``.
    """
    staging = staging_of(cfg.out)
    checkpoint = last_checkpoint(staging) if resume else None
    if resume and checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {staging / CHECKPOINTS}; run without --resume to start over")
    main_process = is_main_process()
    if checkpoint is None and main_process:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    callbacks = [*(callbacks or []), *([Announce(announce)] if announce is not None else [])]
    stop = StopOnSignal()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        callbacks.append(stop)
    try:
        with stop if in_main_thread else contextlib.nullcontext():  # the signal handlers are restored after
            manifest = _train_into(cfg, base_model, staging, checkpoint, callbacks)
    except DataError:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if stop.stopped_at is not None:
        raise Interrupted(stop.stopped_at, staging)
    if not main_process:  # under `accelerate launch`, process 0 writes the artifact
        return manifest
    # Any other failure keeps the staging folder: its checkpoints are what --resume continues from.
    shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(cfg.out, ignore_errors=True)
    staging.rename(cfg.out)
    return manifest


def _train_into(
    cfg: TrainConfig, base_model: str, staging: Path, checkpoint: Path | None, callbacks: list[Any]
) -> AdapterManifest:
    prepared = prepare(cfg, base_model, staging, callbacks)
    trainer = prepared.trainer
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if any(isinstance(c, StopOnSignal) and c.stopped_at is not None for c in callbacks):
        return AdapterManifest.model_construct()  # stopped early: train() keeps the checkpoint, writes nothing
    elapsed = time.perf_counter() - started
    eval_loss = None
    if prepared.eval_examples:
        if trainer.state.best_metric is not None:  # load_best_model_at_end put the best weights back
            eval_loss = float(trainer.state.best_metric)
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])

    if not trainer.is_world_process_zero():
        return AdapterManifest.model_construct()
    trainer.model.save_pretrained(str(staging), safe_serialization=True)
    (staging / "README.md").unlink(missing_ok=True)  # peft's model-card stub; the manifest says it all
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    base = identify(base_model)
    data_files = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    skipped = sum(len(r.invalid_lines) for r in prepared.reports)
    manifest = AdapterManifest(
        task=cfg.task,
        base_model=BaseModelRef(name=base.name, sha256=base.sha256),
        prompt_format=prepared.prompt_format,
        output_schema=load_schema(cfg.schema_file),
        data=DataRef(path=str(cfg.data), sha256=_sha256(data_files), examples=len(prepared.train_examples)),
        split=prepared.split | {"skipped_invalid": skipped},
        lora=_lora_spec(cfg, trainer.model),
        hyperparameters=json.loads(cfg.model_dump_json(by_alias=True)) | {"precision": prepared.precision},
        metrics={
            "train_loss_first": float(losses[0]) if losses else None,
            "train_loss_last": float(losses[-1]) if losses else None,
            "eval_loss": eval_loss,
            "best_eval_loss": float(trainer.state.best_metric) if trainer.state.best_metric else None,
            "steps": float(result.global_step),
            "tokens_seen": float(tokens),
            "tokens_per_second": round(tokens / elapsed, 1) if elapsed else 0.0,
            "wall_seconds": round(elapsed, 2),
        },
        library_versions={name: package_version(name) for name in ("torch", "transformers", "peft", "trl")},
    )
    manifest.write(staging)
    plot_losses(history, staging / "loss.png", title=f"{cfg.task}: loss")
    return manifest


def _lora_spec(cfg: TrainConfig, model: Any) -> LoraSpec:
    """What was trained: the config's LoRA settings, or the continued adapter's own."""
    if cfg.init_adapter is None:
        return LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules())
    peft = model.peft_config["default"]
    return LoraSpec(
        rank=peft.r, alpha=peft.lora_alpha, dropout=peft.lora_dropout, target_modules=sorted(peft.target_modules)
    )


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def is_main_process() -> bool:
    # Set by torchrun / `accelerate launch`; a plain run is process 0.
    return os.environ.get("RANK", "0") == "0"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
