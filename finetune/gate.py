"""The gate a job's new version of an alias passes before it may serve, run where the job trained.

The version is scored on held-out data (the job's ``validation_file``, else the
seeded share of the training file that training held out, the same rows)
against the alias's stable version, or the base model when the alias has none,
with ``lorafleet eval --gate``'s judge, thresholds and McNemar test
(``evaluation``), on in-process vLLM: the engine that serves. The thresholds are
the alias's rollout policy's (``serving.state.policies.RolloutPolicy``); the mode
is the one the alias serves in (``enforce``: constrained decoding, else free
generation checked after).

Loaded only by the job's training process (``finetune.runner``): it imports vLLM.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from contract.examples import check
from contract.store import AdapterStore, AdapterVersion
from evaluation.gate import Thresholds, apply_gate
from evaluation.run import EvalError, EvalSet, Target, evaluate, resolve_targets
from serving.state.policies import GateThresholds
from training.config import TrainConfig
from training.train import split_examples

# The gate's engine holds one batch of short answers: far less KV cache than serving or a whole evaluation.
KV_CACHE_GIB = "1"
MAX_TOKENS = 512  # the most an answer may run to: the longest expected answer's length, with room to spare
# At most this many held-out examples are scored (a seeded sample of them, recorded): on the CPU each one costs
# a generation per version, and 64 paired outcomes already show a drop of a few points (McNemar).
MAX_EXAMPLES = 64


class GateError(Exception):
    """The gate could not be run (no held-out examples, a stable version it cannot load); the message says why."""


@dataclass
class GateResult:
    passed: bool
    against: str  # the stable version's ref, or "base"
    verdict: dict[str, Any]  # ``GateVerdict.as_dict()``, with what it was scored on
    table: list[dict[str, Any]]  # one row per target: n, parse, schema-valid, exact match, field accuracy

    def failures(self) -> list[str]:
        return [f"{c['name']} ({c['mode']}): {c['detail']}" for c in self.verdict["checks"] if not c["passed"]]


def held_out(cfg: TrainConfig, served_schema: dict[str, Any] | None = None) -> tuple[EvalSet, dict[str, Any]]:
    """The examples the version never trained on, and how they were chosen (for the record).

    The files are read as training read them (the job's own schema: a job that trained had no bad row, so the
    seeded split picks the very rows training held out); the answers are then judged as the alias serves them:
    against its policy's default schema when it has one (which wins over the job's, as when serving)."""
    schema = _schema(cfg)
    reports = [check(cfg.data, schema=schema, min_examples=0)]
    if cfg.eval_data is not None:
        reports.append(check(cfg.eval_data, schema=schema, min_examples=0))
    _, examples, split = split_examples(cfg, reports)
    if served_schema is not None:
        examples = [replace(e, schema=served_schema) for e in examples]
    if not examples:
        raise GateError(
            "no held-out examples to gate on: give a validation_file, or keep lorafleet.val_fraction above 0 with "
            "at least 10 training examples"
        )
    source = "validation_file" if split["source"] == "file" else f"held-out split ({split['val_fraction']:.0%})"
    held = len(examples)
    if held > MAX_EXAMPLES:
        chosen = sorted(random.Random(cfg.seed).sample(range(held), MAX_EXAMPLES))
        examples = [examples[i] for i in chosen]
    return EvalSet(cfg.eval_data or cfg.data, examples), {
        "source": source,
        "seed": cfg.seed,
        "held_out": held,
        "examples": len(examples),
    }


def run_gate(
    cfg: TrainConfig,
    candidate: Path,
    alias: str,
    store: AdapterStore,
    base_model: str,
    models_dir: Path,
    thresholds: GateThresholds,
    mode: str,
    served_schema: dict[str, Any] | None = None,
    against: AdapterVersion | None = None,
) -> GateResult:
    """Score ``candidate`` (an adapter folder, not published yet) against the version ``against`` (the one the
    alias serves; ``None``: the base model) on the held-out examples; ``GateError`` when that cannot be done."""
    evalset, scored_on = held_out(cfg, served_schema)
    try:
        baseline = resolve_targets([against.ref], store, base_model, models_dir)[0] if against else Target("base")
    except EvalError as exc:
        raise GateError(f"the stable version cannot be scored: {exc}") from exc
    name = f"{alias}@candidate"
    targets = [Target(name, candidate), baseline]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    results = evaluate(evalset, targets, [mode], base_model, max_tokens=answer_budget(evalset))  # engine closed
    (verdict,) = apply_gate(results, [name], baseline.name, Thresholds(**thresholds.model_dump()))
    table = []
    for scores in results:
        summary = scores.summary()
        table.append(
            {
                "target": "candidate" if scores.target == name else scores.target,
                "mode": scores.mode,
                "n": summary["n"],
                "parse_rate": summary["parse_rate"]["value"],
                "schema_valid_rate": summary["schema_valid_rate"]["value"],
                "exact_match_rate": summary["exact_match_rate"]["value"],
                "field_accuracy": summary["field_accuracy"],
            }
        )
    recorded = verdict.as_dict() | {"scored_on": scored_on, "modes": [mode], "table": table}
    return GateResult(verdict.passed, baseline.name, recorded, table)


def answer_budget(evalset: EvalSet) -> int:
    """Tokens an answer may run to: the longest expected answer at 1.5 characters a token (JSON and English run
    to 3-4; text in other scripts to about 2), so a version that rambles (the base model, a broken candidate)
    costs no more than needed to see that it does."""
    longest = max((len(e.completion) for e in evalset.examples), default=0)
    return max(32, min(MAX_TOKENS, longest * 2 // 3 + 16))


def _schema(cfg: TrainConfig) -> dict[str, Any] | None:
    return json.loads(cfg.schema_file.read_text("utf-8")) if cfg.schema_file else None
