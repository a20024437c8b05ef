"""Where a demo training step's time and memory go: forward, backward and optimiser, per variant of the recipe.

    python -m benchmarks.train_profile [--config configs/orders.yaml] [--steps 6]
    python -m benchmarks.train_profile --config configs/toolcall-gemma.yaml --study memory --steps 4

Builds the trainer exactly as ``lorafleet train`` does (``training.train.prepare``,
on the config's own base model) and times the parts of one optimiser step by
hand on the same batches: the forward pass with the loss (under the trainer's
own autocast), the backward pass, and the optimiser step. Each variant runs in
a process of its own, so its peak resident memory is its own too.

``--study step`` (default): the config as given (the baseline), with LoRA
dropout 0.05 (as the demo recipe had it before), and with LoRA on the
attention projections only. ``--study memory``: the config with one batch of 8
per step (the baseline), the same 8 as 4 × 2 accumulated, and the loss through
TRL's fused LM head (which never builds the whole logits tensor) instead of the
plain loss ``lorafleet train`` uses on the CPU. Prints the median seconds per
part, useful tokens per second, the peak RSS, and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


STUDIES: dict[str, dict[str, dict[str, Any]]] = {
    "step": {
        "as configured (baseline)": {},
        "LoRA dropout 0.05 (the recipe before)": {"dropout": 0.05},
        "LoRA on attention only": {"targets": "attention"},
    },
    "memory": {
        "batch 8 (baseline)": {"batch_size": 8, "grad_accum": 1},
        "batch 4 x 2 accumulated": {"batch_size": 4, "grad_accum": 2},
        "batch 8, TRL's fused LM-head loss": {"batch_size": 8, "grad_accum": 1, "fused_loss": True},
    },
}


def measure(config: Path, steps: int, changes: dict[str, Any]) -> dict[str, float]:
    """Median seconds per part of ``steps`` optimiser steps (after one warm-up) and this process's peak RSS."""
    from trl import SFTTrainer

    from contract.settings import CommonSettings
    from training.config import load_config
    from training.train import prepare

    changes = dict(changes)
    fused = changes.pop("fused_loss", False)
    cfg = load_config(config, {"out": Path(tempfile.mkdtemp()) / "run", **changes})
    settings = CommonSettings(data_dir=ROOT / "var")
    trainer = prepare(cfg, settings.model_path(cfg.base_model or settings.base_model), Path(tempfile.mkdtemp())).trainer
    # The trainer's own loss on the CPU is the plain one over whole logits; SFTTrainer's is the fused one.
    compute_loss = SFTTrainer.compute_loss if fused else type(trainer).compute_loss
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
    batches = iter(trainer.get_train_dataloader())
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "tokens": []}
    for step in range(steps + 1):  # the first step warms up and is not counted
        forward = backward = tokens = 0.0
        for _ in range(cfg.grad_accum):
            batch = trainer._prepare_inputs(next(batches))
            tokens += float(batch["attention_mask"].sum())
            started = time.perf_counter()
            with trainer.autocast_smart_context_manager():
                loss = compute_loss(trainer, model, batch) / cfg.grad_accum
            middle = time.perf_counter()
            loss.backward()
            forward, backward = forward + middle - started, backward + time.perf_counter() - middle
        started = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if step:
            parts["forward"].append(forward)
            parts["backward"].append(backward)
            parts["optimizer"].append(time.perf_counter() - started)
            parts["tokens"].append(tokens)
    medians = {k: statistics.median(v) for k, v in parts.items()}
    medians["step"] = medians["forward"] + medians["backward"] + medians["optimizer"]
    medians["tokens_per_s"] = medians["tokens"] / medians["step"]
    medians["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return medians


def measure_apart(config: Path, steps: int, study: str, variant: str) -> dict[str, float]:
    """``measure`` in a fresh process (this program with ``--variant``): the peak memory is the variant's alone."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_profile",
        "--config",
        str(config),
        "--steps",
        str(steps),
        "--study",
        study,
        "--variant",
        variant,
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: the measurement failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "orders.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--study", choices=sorted(STUDIES), default="step")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, measured in this process: JSON out
    args = parser.parse_args()
    variants = STUDIES[args.study]
    if args.variant:
        print(json.dumps(measure(args.config, args.steps, variants[args.variant])))
        return
    rows = {name: measure_apart(args.config, args.steps, args.study, name) for name in variants}
    base = next(iter(rows.values()))
    print(f"\nwhere a training step goes: {args.config.name}, median of {args.steps} steps (after one warm-up)\n")
    print(
        "| variant | forward+loss s | backward s | optimizer s | step s | tokens/step | tok/s | x baseline "
        "| peak RSS GiB | x baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(
            f"| {name} | {m['forward']:.2f} | {m['backward']:.2f} | {m['optimizer']:.3f} | {m['step']:.2f} | "
            f"{m['tokens']:.0f} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{m['peak_gib']:.1f} | {m['peak_gib'] / base['peak_gib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
