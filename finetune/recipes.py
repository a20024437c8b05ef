"""The base models' recipes, and what a job's hyperparameters resolve to.

A recipe (``finetune/recipes/<base model>.yaml``, else ``default.yaml``) holds
the training settings that suit a base model. A job's ``"auto"`` values come
from it when the job starts, and are shown resolved on the job from then on:

- ``batch_size``: the recipe's;
- ``learning_rate_multiplier``: 1; the learning rate is the recipe's times the multiplier (OpenAI's meaning:
  the multiplier scales the provider's own rate);
- ``n_epochs``: enough passes to see ``examples_seen`` examples (small files get more passes), between 1 and
  ``max_epochs``.

The job's ``lorafleet`` object may set LoRA's rank, alpha, dropout and targets,
``max_steps``, ``max_length``, and how often to evaluate and checkpoint; what it
leaves out comes from the recipe.
"""

from __future__ import annotations

import math
from importlib.resources import files
from typing import Any

import yaml

AUTO = "auto"
LORA_OPTIONS = ("rank", "alpha", "dropout", "targets", "max_length")


def recipe(base_model: str) -> dict[str, Any]:
    """The recipe of ``base_model`` (its directory's or provisioned name)."""
    folder = files("finetune") / "recipes"
    name = base_model.rstrip("/").rsplit("/", 1)[-1]
    source = folder / f"{name}.yaml"
    if not source.is_file():
        source = folder / "default.yaml"
    loaded: dict[str, Any] = yaml.safe_load(source.read_text("utf-8"))
    return loaded


def resolve(hyperparameters: dict[str, Any], base_model: str, examples: int) -> dict[str, Any]:
    """The job's hyperparameters with every ``"auto"`` (or missing) value decided, for ``examples`` training
    examples."""
    rules = recipe(base_model)
    batch = hyperparameters.get("batch_size", AUTO)
    batch = rules["batch_size"] if batch == AUTO else int(batch)
    multiplier = hyperparameters.get("learning_rate_multiplier", AUTO)
    multiplier = 1.0 if multiplier == AUTO else float(multiplier)
    epochs = hyperparameters.get("n_epochs", AUTO)
    if epochs == AUTO:
        epochs = min(rules["max_epochs"], max(1, math.ceil(rules["examples_seen"] / max(examples, 1))))
    return {"batch_size": batch, "learning_rate_multiplier": multiplier, "n_epochs": int(epochs)}


def train_settings(resolved: dict[str, Any], options: dict[str, Any], base_model: str) -> dict[str, Any]:
    """``TrainConfig`` fields from the resolved hyperparameters, the job's ``lorafleet`` options and the recipe."""
    rules = recipe(base_model)
    settings = {name: options.get(name, rules[name]) for name in LORA_OPTIONS}
    settings |= {
        "batch_size": resolved["batch_size"],
        "epochs": float(resolved["n_epochs"]),
        "learning_rate": rules["learning_rate"] * resolved["learning_rate_multiplier"],
        "warmup_ratio": rules["warmup_ratio"],
    }
    for name in ("max_steps", "eval_every", "save_every", "log_every"):
        if options.get(name) is not None:
            settings[name] = options[name]
    return settings
