"""Evaluate the base model and adapter versions on held-out data, with the engine that serves.

    lorafleet eval --data data/orders/test.jsonl --schema data/orders/schema.json \\
        --target base --target orders@1 --mode unconstrained --mode constrained --out var/eval/orders

Everything is checked before generation starts (data rows, targets, adapter
fit). Generation runs in-process on vLLM, batched, greedy; ``constrained``
mode enforces each example's JSON Schema with vLLM's structured outputs. Each
output is judged by ``contract.judge`` (the gateway's judge) and scored by
``evaluation.scores``. Writes ``report.json`` and ``report.md`` under ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.basemodel import identify
from contract.examples import DataError, Example, check
from contract.manifest import ManifestError, read_manifest
from contract.prompt import render, with_tools
from contract.store import AdapterStore, StoreError
from evaluation.scores import Generation, TargetScores, score

MODES = ("unconstrained", "constrained")


class EvalError(ValueError):
    """The evaluation cannot start; the message names what is wrong and the fix."""


@dataclass(frozen=True)
class Target:
    name: str  # "base" or "alias@version"
    path: Path | None  # adapter directory; None for the base model


def resolve_targets(names: list[str], store: AdapterStore, base_model: str) -> list[Target]:
    """Every target, checked against the store and the base model; all problems at once."""
    base = identify(base_model)
    targets, problems = [], []
    for name in names:
        if name == "base":
            targets.append(Target(name, None))
            continue
        alias, _, version = name.partition("@")
        try:
            found = store.get(alias, int(version)) if version.isdigit() else store.latest(alias)
            if found is None:
                raise StoreError(f"no adapter {alias!r} in {store.root}")
            manifest = read_manifest(found.path)
        except (StoreError, ManifestError) as exc:
            problems.append(f"target {name}: {exc}; list versions with `lorafleet adapters list`")
            continue
        mismatch = manifest.base_mismatch(base.name, base.sha256)
        if mismatch:
            problems.append(f"target {name}: {mismatch}")
            continue
        targets.append(Target(found.ref, found.path))
    if problems:
        raise EvalError("cannot evaluate:\n  " + "\n  ".join(problems))
    return targets


def load_examples(path: Path, schema_path: Path | None) -> list[Example]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    schema = json.loads(schema_path.read_text("utf-8")) if schema_path else None
    report = check(path, schema=schema, min_examples=1)
    if report.errors:
        raise EvalError(str(DataError(report, fix="Fix them.")))
    return report.examples


def evaluate(
    examples: list[Example],
    targets: list[Target],
    modes: list[str],
    base_model: str,
    *,
    max_tokens: int = 256,
    max_lora_rank: int = 16,
) -> list[TargetScores]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    adapters = [t for t in targets if t.path is not None]
    llm = LLM(
        model=base_model,
        enable_lora=bool(adapters),
        max_lora_rank=max_lora_rank,
        max_loras=max(1, len(adapters)),
        max_model_len=2048,
        disable_log_stats=False,
        seed=0,
    )
    tokenizer: Any = llm.get_tokenizer()
    prompts = [
        render(tokenizer.chat_template, with_tools(e.messages, e.tools), add_generation_prompt=True,
               bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
        for e in examples
    ]  # fmt: skip
    results = []
    for lora_id, target in enumerate(targets, start=1):
        lora = LoRARequest(target.name, lora_id, str(target.path)) if target.path else None
        for mode in modes:
            params = [
                SamplingParams(
                    temperature=0.0,
                    max_tokens=max_tokens,
                    structured_outputs=StructuredOutputsParams(json=e.schema)
                    if mode == "constrained" and e.schema
                    else None,
                )
                for e in examples
            ]
            started = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            wall = time.perf_counter() - started
            scores = TargetScores(target.name, mode)
            for example, out in zip(examples, outputs, strict=True):
                completion = out.outputs[0]
                gen = Generation(completion.text, completion.finish_reason, _latency(out, wall),
                                 len(completion.token_ids))  # fmt: skip
                scores.items.append(score(gen, expected=example.completion, schema=example.schema))
            scores.wall_s = wall
            results.append(scores)
    return results


def _latency(out: Any, batch_wall: float) -> float:
    m = getattr(out, "metrics", None)
    if m is not None and m.last_token_ts and m.queued_ts:
        return float(m.last_token_ts - m.queued_ts)
    return batch_wall


def write_report(results: list[TargetScores], out: Path, data: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary() | {"wall_s": round(r.wall_s, 2)} for r in results]
    report = {"data": str(data), "results": summaries}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Evaluation on `{data}`",
        "",
        "| target | mode | n | schema-valid | exact match | field accuracy | parse | truncated | p50 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        field = f"{s['field_accuracy']:.3f}" if s["field_accuracy"] is not None else "-"
        p50 = f"{s['latency_p50_s']:.2f}" if s["latency_p50_s"] is not None else "-"
        lines.append(
            f"| {s['target']} | {s['mode']} | {s['n']} | {_pct(s['schema_valid_rate'])} | "
            f"{_pct(s['exact_match_rate'])} | {field} | {_pct(s['parse_rate'])} | {_pct(s['truncated_rate'])} | {p50} |"
        )
    lines += ["", "Rates with 95% Wilson intervals."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def _pct(rate: dict[str, Any]) -> str:
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.0f}–{100 * rate['high']:.0f}]"
