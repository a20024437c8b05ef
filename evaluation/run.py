"""Evaluate the base model and adapter versions on held-out data, with the engine that serves.

    lorafleet eval --data data/orders/test.jsonl --schema data/orders/schema.json \\
        --target base --target orders@1 --mode unconstrained --mode constrained --out var/eval/orders

Targets on several base models in one run: ``base`` is the default base model,
``base:gemma-3-270m`` another provisioned one, and an adapter trained on
another base runs on that base (found under the models folder by its name and
sha256). Each base's targets are generated on its own engine, one base after
the other, and scored by the same judge into one report.

Everything is checked before generation starts (data rows, answers, targets,
adapter fit). Generation runs in-process on vLLM, batched and greedy, or
through a running gateway (``--gateway URL``) exactly as a client would call
it. ``constrained`` mode enforces each example's JSON Schema with vLLM's
structured outputs (``response_format`` through the gateway). Each output is
judged by ``contract.judge`` (the gateway's judge) and scored by
``evaluation.scores``; ``evaluation.report`` writes the reports and
``evaluation.gate`` decides.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from contract.basemodel import identify, provisioned
from contract.examples import DataError, Example, check, read_rows
from contract.manifest import ManifestError, read_manifest
from contract.prompt import render, with_tools
from contract.settings import CommonSettings, laid_out
from contract.store import AdapterStore, AdapterVersion, StoreError
from evaluation.scores import HELD_OUT, Generation, TargetScores, score

MODES = ("unconstrained", "constrained")
GroundTruth = dict[str, dict[str, list[Any]]]


class EvalError(ValueError):
    """The evaluation cannot start; the message names what is wrong and the fix."""


@dataclass(frozen=True)
class Target:
    name: str  # "base", "base:MODEL" or "alias@version" (through a gateway: the alias as a client names it)
    path: Path | None = None  # adapter directory; None for the base model or a gateway alias
    version: AdapterVersion | None = None
    base: str | None = None  # the base model directory it runs on; None: the run's default base


@dataclass
class EvalSet:
    """Held-out examples, with BFCL-style acceptable answers where an answers file was given."""

    path: Path
    examples: list[Example]
    ground_truth: list[GroundTruth | None] = field(default_factory=list)
    split: str = HELD_OUT

    def __post_init__(self) -> None:
        if not self.ground_truth:
            self.ground_truth = [None] * len(self.examples)


def resolve_targets(
    names: list[str], store: AdapterStore, base_model: str, models_dir: Path | None = None
) -> list[Target]:
    """Every target, checked against the store and the base models; all problems at once.

    ``ALIAS`` means the version the gateway serves for it (stable, else newest); ``base:MODEL`` a base model
    provisioned under ``models_dir``. An adapter that does not fit ``base_model`` runs on its own base, if that is
    provisioned under ``models_dir`` (the same name and sha256).
    """
    base = identify(base_model)
    targets: list[Target] = []
    problems = []
    for name in names:
        if name == "base":
            targets.append(Target("base"))
            continue
        if name.startswith("base:"):
            other = provisioned(models_dir, name.removeprefix("base:"))
            if other is None:
                problems.append(
                    f"target {name}: no base model {name.removeprefix('base:')!r} in {models_dir}; "
                    f"run `lorafleet model pull {name.removeprefix('base:')}`"
                )
            else:
                targets.append(Target(name, base=str(other)))
            continue
        alias, _, version = name.partition("@")
        try:
            found = store.get(alias, int(version)) if version.isdigit() else store.serving(alias)
            if found is None:
                raise StoreError(f"no adapter {alias!r} in {store.root}")
            manifest = read_manifest(found.path)
        except (StoreError, ManifestError) as exc:
            problems.append(f"target {name}: {exc}; list versions with `lorafleet adapters list`")
            continue
        own_base = None
        mismatch = manifest.base_mismatch(base.name, base.sha256)
        if mismatch:
            own_base = provisioned(models_dir, manifest.base_model.name, manifest.base_model.sha256)
            if own_base is None:
                problems.append(
                    f"target {name}: {mismatch}, and {manifest.base_model.name} is not provisioned in "
                    f"{models_dir} (`lorafleet model pull {manifest.base_model.name}`)"
                )
                continue
        if any(t.name == found.ref for t in targets):
            continue  # `orders` and `orders@2` may name the same version
        targets.append(Target(found.ref, found.path, found, str(own_base) if own_base else None))
    if problems:
        raise EvalError("cannot evaluate:\n  " + "\n  ".join(problems))
    return targets


def load_examples(path: Path, schema_path: Path | None, answers: Path | None = None, split: str = HELD_OUT) -> EvalSet:
    """Read and check the held-out set (every problem at once), joining BFCL answers by ``id``."""
    for p in (path, schema_path, answers):
        if p is not None and not p.is_file():
            raise EvalError(f"{p}: no such file")
    try:
        schema = json.loads(schema_path.read_text("utf-8")) if schema_path else None
    except json.JSONDecodeError as exc:
        raise EvalError(f"{schema_path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the schema file") from exc
    report = check(path, schema=schema, min_examples=1)
    if report.errors:
        raise EvalError(str(DataError(report, fix="Fix them: every held-out row needs its expected output.")))
    evalset = EvalSet(path, report.examples, split=split)
    if answers is not None:
        evalset.ground_truth = _join_answers(evalset, answers)
    return evalset


def _join_answers(evalset: EvalSet, answers: Path) -> list[GroundTruth | None]:
    rows, unreadable = read_rows(answers)
    problems = [str(p) for p in unreadable]
    by_id: dict[str, GroundTruth] = {}
    for line, row in rows:
        truth = row.get("ground_truth") if isinstance(row, dict) else None
        if not isinstance(truth, list) or not truth or not isinstance(truth[0], dict) or "id" not in row:
            shape = '{"id", "ground_truth": [{function: {argument: [acceptable values]}}]}'
            problems.append(f"{answers}:{line}: not an answer row; expected {shape}")
            continue
        by_id[str(row["id"])] = truth[0]
    joined: list[GroundTruth | None] = []
    for example in evalset.examples:
        if example.id is None or example.id not in by_id:
            what = "has no 'id'" if example.id is None else f"id {example.id!r} has no answer in {answers}"
            problems.append(f"{evalset.path}:{example.line}: {what}; give every row the id of its answer")
        joined.append(by_id.get(example.id or ""))
    if problems:
        raise EvalError("cannot join the answers:\n  " + "\n  ".join(problems[:20]))
    return joined


def prompts_of(examples: list[Example], tokenizer: Any) -> list[str]:
    """Each example's prompt, rendered exactly as training rendered it (the base model's chat template)."""
    return [
        render(
            tokenizer.chat_template,
            with_tools(e.messages, e.tools),
            add_generation_prompt=True,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )
        for e in examples
    ]


def open_engine(base_model: str, adapters: int, max_lora_rank: int = 16) -> Any:
    """The in-process vLLM engine the offline evaluation (and its benchmark) generates with: enforced JSON as the
    gateway's engines enforce it (``CommonSettings.structured_outputs``), LoRA with the gateway's ops."""
    settings = CommonSettings()
    # On the CPU, vLLM otherwise reserves 92% of the NUMA node's memory and
    # refuses to start when anything else holds some; 4 GiB of KV cache is
    # ample for batched evaluation of a 135M model.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["LORAFLEET_LORA_OPS"] = settings.lora_ops  # for lorafleet's vLLM plugin in the engine's processes
    from vllm import LLM

    return LLM(
        model=base_model,
        enable_lora=adapters > 0,
        max_lora_rank=max_lora_rank,
        max_loras=max(1, adapters),
        max_model_len=2048,
        disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics) for the latency columns
        seed=0,
        structured_outputs_config=settings.structured_outputs(),
    )


def sampling_params(
    examples: list[Example], mode: str, max_tokens: int, layout: dict[str, Any] | None = None
) -> list[Any]:
    """Greedy sampling for each example; constrained: its schema enforced with ``layout``
    (``CommonSettings.json_layout``), as the gateway sends it."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return [
        SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            structured_outputs=(
                StructuredOutputsParams(json=laid_out(e.schema, layout)) if mode == "constrained" and e.schema else None
            ),
        )
        for e in examples
    ]


def evaluate(
    evalset: EvalSet | list[EvalSet],
    targets: list[Target],
    modes: list[str],
    base_model: str,
    *,
    max_tokens: int = 256,
    llm: Any = None,
) -> list[TargetScores]:
    """Generate every example of every held-out set for every target and mode on in-process vLLM, one batch each,
    and score it. Targets on other base models (``Target.base``) run on an engine of their own, opened after the
    default base's."""
    evalsets = evalset if isinstance(evalset, list) else [evalset]
    by_base: dict[str, list[Target]] = {}
    for target in targets:
        by_base.setdefault(target.base or base_model, []).append(target)
    results: dict[str, list[TargetScores]] = {}
    for model, group in by_base.items():
        own = llm if model == base_model else None
        results |= _evaluate_on(evalsets, group, modes, model, max_tokens, own)
    return [scores for target in targets for scores in results[target.name]]


def _evaluate_on(
    evalsets: list[EvalSet], targets: list[Target], modes: list[str], base_model: str, max_tokens: int, llm: Any
) -> dict[str, list[TargetScores]]:
    from vllm.lora.request import LoRARequest

    layout = CommonSettings().json_layout
    opened = llm is None
    if llm is None:
        ranks = [read_manifest(t.path).lora.rank for t in targets if t.path is not None]
        # vLLM sizes its LoRA buffers for one of a few ranks: the smallest that fits every target.
        max_rank = next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= max(ranks, default=8))
        llm = open_engine(base_model, len(ranks), max_rank)
    try:
        tokenizer = llm.get_tokenizer()
        # As the gateway's chat route is served: the rendered prompt (with the template's own <bos>, if it writes
        # one) tokenized without adding special tokens; a text prompt would get the tokenizer's <bos> on top.
        prompts = [
            [
                {"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]}
                for p in prompts_of(evalset.examples, tokenizer)
            ]
            for evalset in evalsets
        ]
        results: dict[str, list[TargetScores]] = {}
        for lora_id, target in enumerate(targets, start=1):
            lora = LoRARequest(target.name, lora_id, str(target.path)) if target.path else None
            for evalset, asked in zip(evalsets, prompts, strict=True):
                for mode in modes:
                    started = time.perf_counter()
                    params = sampling_params(evalset.examples, mode, max_tokens, layout)
                    outputs = llm.generate(asked, params, lora_request=lora, use_tqdm=False)
                    wall = time.perf_counter() - started
                    generations = [
                        Generation(c.text, c.finish_reason, _latency(o, wall), len(c.token_ids))
                        for o in outputs
                        for c in o.outputs[:1]
                    ]
                    scores = _scored(evalset, target.name, mode, generations, wall)
                    results.setdefault(target.name, []).append(scores)
        return results
    finally:
        if opened:
            close_engine(llm)


def close_engine(llm: Any) -> None:
    """Stop an engine ``open_engine`` made (its engine-core process), so another base's can start."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _scored(evalset: EvalSet, target: str, mode: str, generations: list[Generation], wall: float) -> TargetScores:
    scores = TargetScores(target, mode, wall_s=wall, split=evalset.split)
    for example, truth, gen in zip(evalset.examples, evalset.ground_truth, generations, strict=True):
        scores.items.append(score(gen, expected=example.completion, schema=example.schema, ground_truth=truth))
    return scores


def _latency(out: Any, batch_wall: float) -> float:
    # The engine's own timestamps: from the request's arrival to its last token.
    # In a batch every request arrives at once, so this includes queueing behind
    # the others, as it would for a burst of traffic.
    m = getattr(out, "metrics", None)
    if m is not None and getattr(m, "last_token_ts", None) and getattr(m, "queued_ts", None):
        return float(m.last_token_ts - m.queued_ts)
    return batch_wall


async def evaluate_gateway(
    evalset: EvalSet,
    aliases: list[str],
    modes: list[str],
    url: str,
    api_key: str,
    *,
    max_tokens: int = 256,
    concurrency: int = 8,
    timeout_s: float = 300.0,
) -> list[TargetScores]:
    """The same evaluation through a running gateway's chat API: what a client gets, latency included.

    The target is reported as the version that answered (the gateway's
    ``x-lorafleet-adapter`` header), so a report never confuses versions.
    """
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, limits=limits) as client:
        await _check_gateway(client, aliases)
        gate = asyncio.Semaphore(concurrency)
        results = []
        for alias in aliases:
            for mode in modes:
                started = time.perf_counter()
                answers = await asyncio.gather(
                    *(_ask(client, gate, alias, e, mode, max_tokens) for e in evalset.examples)
                )
                wall = time.perf_counter() - started
                served = sorted({ref for _, ref in answers if ref})
                name = served[0] if len(served) == 1 else alias
                results.append(_scored(evalset, name, mode, [g for g, _ in answers], wall))
    return results


async def _check_gateway(client: httpx.AsyncClient, aliases: list[str]) -> None:
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise EvalError(f"cannot reach the gateway at {client.base_url}: {exc}; is `lorafleet serve` running?") from exc
    if resp.status_code != 200:
        raise EvalError(f"the gateway at {client.base_url} answered {resp.status_code}: {resp.text[:300]}")
    served = {m["id"] for m in resp.json()["data"]}
    missing = [a for a in aliases if a.partition("@")[0] not in served]
    if missing:
        raise EvalError(
            f"the gateway does not serve {missing} to this key (it serves {sorted(served)}); "
            "grant the alias to the tenant, or evaluate offline without --gateway"
        )


async def _ask(
    client: httpx.AsyncClient, gate: asyncio.Semaphore, alias: str, example: Example, mode: str, max_tokens: int
) -> tuple[Generation, str | None]:
    body: dict[str, Any] = {
        "model": alias,
        "messages": with_tools(example.messages, example.tools),
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    if mode == "constrained" and example.schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "expected", "schema": example.schema}}
    async with gate:
        started = time.perf_counter()
        resp = await client.post("/v1/chat/completions", json=body)
        latency = time.perf_counter() - started
    if resp.status_code != 200:
        raise EvalError(f"the gateway answered {resp.status_code} for {alias}: {resp.text[:300]}")
    data = resp.json()
    choice = data["choices"][0]
    tokens = int(data.get("usage", {}).get("completion_tokens", 0))
    gen = Generation(choice["message"].get("content") or "", choice.get("finish_reason"), latency, tokens)
    return gen, resp.headers.get("x-lorafleet-adapter")
