"""Training speed: lorafleet's trainer against a plain transformers + peft baseline.

    python -m benchmarks.train_speed [--steps 12] [--batch-size 8]

Same base model, same data (the orders train split), same LoRA (rank 16 on the
attention projections), same number of optimiser steps and batch size; each
variant runs in its own process so its peak RSS is its own.

- baseline: transformers ``Trainer`` + peft, fp32, every batch padded to
  ``max_length`` (256), loss on all tokens: what a first notebook does.
- lorafleet: ``training.train.prepare`` (TRL ``SFTTrainer``, completion-only
  loss, dynamic padding with length-grouped batches, bf16 autocast where the
  CPU has it).

Useful tokens are the non-padding tokens fed to the model. Prints useful
tokens/s, wall time and peak RSS for both, and lorafleet/baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data/orders/train.jsonl"
MAX_LENGTH = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PACKING = False


class CountingCollator:
    """Wraps a collator and counts the non-padding tokens of every batch it builds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens = inner, 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        # Packed (padding-free) batches carry position_ids and no padding at all.
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def run_baseline(base_model: str, steps: int, batch_size: int, work: Path) -> tuple[float, int]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from contract.prompt import example_messages

    tok = AutoTokenizer.from_pretrained(base_model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [
        tok.apply_chat_template([*example_messages(r), {"role": "assistant", "content": r["output"]}], tokenize=False)
        for r in rows
    ]
    enc = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    dataset = Dataset.from_dict({**enc, "labels": enc["input_ids"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work / "baseline"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=2e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=steps,
        seed=0,
    )
    collator = CountingCollator(default_data_collator)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, collator.tokens


def run_lorafleet(base_model: str, steps: int, batch_size: int, work: Path) -> tuple[float, int]:
    from training.config import TrainConfig
    from training.train import prepare

    cfg = TrainConfig.model_validate(
        {
            "data": DATA,
            "out": work / "out",
            "max_steps": steps,
            "batch_size": batch_size,
            "rank": 16,
            "alpha": 32,
            "targets": "attention",
            "max_length": MAX_LENGTH,
            "val_fraction": 0.0,
            "log_every": steps,
            "packing": PACKING,
        }
    )
    prepared = prepare(cfg, base_model, work / "staging")
    collator = CountingCollator(prepared.trainer.data_collator)
    prepared.trainer.data_collator = collator
    started = time.perf_counter()
    prepared.trainer.train()
    return time.perf_counter() - started, collator.tokens


def child(variant: str, steps: int, batch_size: int) -> None:
    from contract.settings import CommonSettings

    base_model = CommonSettings().base_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_baseline if variant == "baseline" else run_lorafleet
        wall, tokens = run(base_model, steps, batch_size, Path(tmp))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "tokens": tokens, "peak_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variant", choices=["baseline", "lorafleet"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args.steps, args.batch_size)
        return
    results = {}
    for variant in ("baseline", "lorafleet"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.train_speed",
                "--variant",
                variant,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["baseline"]
    print(
        f"\ntraining speed: {args.steps} optimiser steps x batch {args.batch_size}, orders train split, "
        f"LoRA r=16 on attention, SmolLM2-135M-Instruct, CPU"
    )
    print(
        f"{'trainer':<34} | {'useful tok/s':>12} | {'x baseline':>10} | {'wall s':>7} | {'peak RSS MiB':>12} | "
        f"{'x baseline':>10}"
    )
    print("-" * 100)
    for variant, label in (("baseline", "transformers+peft fp32, padded"), ("lorafleet", "lorafleet")):
        r = results[variant]
        tps = r["tokens"] / r["wall"]
        print(
            f"{label:<34} | {tps:>12.1f} | {tps / (base['tokens'] / base['wall']):>10.2f} | {r['wall']:>7.1f} | "
            f"{r['peak_mib']:>12.0f} | {r['peak_mib'] / base['peak_mib']:>10.2f}"
        )


if __name__ == "__main__":
    main()
