"""Where a demo training step's time goes: forward, backward and optimiser, per LoRA placement.

    python -m benchmarks.train_profile [--config configs/orders.yaml] [--steps 6]

Builds the trainer exactly as ``lorafleet train`` does (``training.train.prepare``)
and times the parts of one optimiser step by hand on the same batches: the
forward pass with the loss (under the trainer's own autocast), the backward
pass, and the optimiser step. Variants of the config, each measured in the
same run on the same batches: the config as shipped (the baseline), with LoRA
dropout 0.05 (as the demo recipe had it before), and with LoRA on the
attention projections only. Prints the median
seconds per part, useful tokens per second, and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(config: Path, steps: int, changes: dict[str, Any]) -> dict[str, float]:
    import torch

    from contract.settings import CommonSettings
    from training.config import load_config
    from training.train import prepare

    cfg = load_config(config, {"out": Path(tempfile.mkdtemp()) / "run", **changes})
    prepared = prepare(cfg, CommonSettings(data_dir=ROOT / "var").base_model_path(), Path(tempfile.mkdtemp()))
    trainer = prepared.trainer
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
    batches = iter(trainer.get_train_dataloader())
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "tokens": []}
    for step in range(steps + 1):  # the first step warms up and is not counted
        batch = next(batches)
        tokens = float(batch["attention_mask"].sum())
        started = time.perf_counter()
        with trainer.autocast_smart_context_manager():
            loss = trainer.compute_loss(model, batch)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if step:
            parts["forward"].append(forward - started)
            parts["backward"].append(backward - forward)
            parts["optimizer"].append(done - backward)
            parts["tokens"].append(tokens)
    del model, trainer
    torch.set_grad_enabled(True)
    medians = {k: statistics.median(v) for k, v in parts.items()}
    medians["step"] = medians["forward"] + medians["backward"] + medians["optimizer"]
    medians["tokens_per_s"] = medians["tokens"] / medians["step"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "orders.yaml")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    variants = {
        "as shipped (baseline)": {},
        "LoRA dropout 0.05 (the recipe before)": {"dropout": 0.05},
        "LoRA on attention only": {"targets": "attention"},
    }
    rows = {name: measure(args.config, args.steps, changes) for name, changes in variants.items()}
    base = rows["as shipped (baseline)"]
    print(f"\nwhere a training step goes: {args.config.name}, median of {args.steps} steps (after one warm-up)\n")
    print("| variant | forward+loss s | backward s | optimizer s | step s | tokens/step | tok/s | x baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(
            f"| {name} | {m['forward']:.2f} | {m['backward']:.2f} | {m['optimizer']:.3f} | {m['step']:.2f} | "
            f"{m['tokens']:.0f} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base['tokens_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
