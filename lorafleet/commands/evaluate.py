"""``lorafleet eval``: score the base model and adapter versions on held-out data, and gate them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from contract.settings import CommonSettings
from lorafleet.commands.model import require_base_model
from lorafleet.console import console, err, fail


def eval_(
    data: Annotated[
        Path, typer.Option(help="Held-out examples (any training format; the answer is the expected output).")
    ],
    target: Annotated[
        list[str],
        typer.Option(
            help="base, base:MODEL (another provisioned base model), ALIAS (the version it "
            "serves) or ALIAS@VERSION, on its own base model; repeatable."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the reports (json, md, png, failures, review sheet).")],
    schema: Annotated[
        Path | None, typer.Option(help="JSON Schema for every output (rows may carry their own).")
    ] = None,
    answers: Annotated[
        Path | None, typer.Option(help="BFCL-style answers joined to the rows by id: scores call accuracy.")
    ] = None,
    robust: Annotated[
        Path | None,
        typer.Option(
            help="A robustness split (phrasings unlike training; same schema and answers): scored beside --data, "
            "reported under OUT/robust, and judged by --gate too."
        ),
    ] = None,
    mode: Annotated[list[str] | None, typer.Option(help="unconstrained and/or constrained (default: both).")] = None,
    max_tokens: int = 256,
    gateway: Annotated[
        str | None, typer.Option(help="Evaluate through a running gateway at this URL instead of in-process vLLM.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LORAFLEET_API_KEY", help="Tenant key for --gateway.")] = None,
    gate: Annotated[
        bool, typer.Option(help="Apply the thresholds to every adapter target, record the verdict, exit 1 on failure.")
    ] = False,
    stable: Annotated[
        str | None, typer.Option(help="Version to compare against (default: the alias's stable version).")
    ] = None,
    min_valid: Annotated[float, typer.Option(help="Gate: minimum schema-valid rate.")] = 0.95,
    min_field_accuracy: Annotated[float, typer.Option(help="Gate: minimum mean field accuracy.")] = 0.90,
    max_drop: Annotated[float, typer.Option(help="Gate: largest tolerated drop against stable.")] = 0.02,
    alpha: Annotated[float, typer.Option(help="Gate: a drop counts when significant at this level.")] = 0.05,
    review: Annotated[int, typer.Option(help="Prompts in the side-by-side review sheet.")] = 20,
    worst: Annotated[int, typer.Option(help="Worst failures listed per target and mode in report.md.")] = 5,
) -> None:
    """Score the base model and adapter versions on held-out data; with --gate, decide whether they may serve."""
    import asyncio

    from evaluation.gate import Thresholds, apply_gate
    from evaluation.run import MODES, EvalError, evaluate, evaluate_gateway, load_examples, resolve_targets
    from evaluation.scores import ROBUST
    from serving.state.ledger import open_store

    settings = CommonSettings()
    store = open_store(settings)
    modes = mode or list(MODES)
    try:
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise EvalError(f"unknown --mode {bad}: use {list(MODES)}")
        try:
            thresholds = Thresholds(min_valid, min_field_accuracy, max_drop, alpha)
        except ValueError as exc:
            raise EvalError(f"gate threshold: {exc}") from exc
        evalsets = [load_examples(data, schema, answers)]
        if robust is not None:
            evalsets.append(load_examples(robust, schema, answers, split=ROBUST))
        if gateway:
            if gate:
                raise EvalError("--gate needs the versions themselves: evaluate offline (without --gateway)")
            if "base" in target:
                raise EvalError("the gateway serves adapters, not the bare base model: drop --target base")
            if not api_key:
                raise EvalError("--gateway needs a tenant key: pass --api-key or set LORAFLEET_API_KEY")
        else:
            require_base_model(settings)
            names = list(target)
            stable_ref = _stable_for_gate(store, names, stable) if gate else None
            if stable_ref and stable_ref not in names:
                names.append(stable_ref)
            targets = resolve_targets(names, store, settings.base_model_path(), settings.models_dir)
    except EvalError as exc:
        raise fail(str(exc)) from exc
    verdicts = []
    if gateway:
        try:
            results = []
            for evalset in evalsets:
                run = evaluate_gateway(evalset, target, modes, gateway, api_key or "", max_tokens=max_tokens)
                results += asyncio.run(run)
        except EvalError as exc:
            raise fail(str(exc)) from exc
    else:
        results = evaluate(evalsets, targets, modes, settings.base_model_path(), max_tokens=max_tokens)
        if gate:
            candidates = [t for t in targets if t.version is not None and t.name != stable_ref]
            verdicts = apply_gate(results, [t.name for t in candidates], stable_ref, thresholds)
            recorded = {"data": str(data), "modes": modes} | ({"robust": str(robust)} if robust else {})
            for t, verdict in zip(candidates, verdicts, strict=True):
                assert t.version is not None
                store.record_gate(t.version, verdict.as_dict() | recorded)
    _write_reports(results, evalsets, out, verdicts, worst=worst, review=review)
    if not gateway and gate:
        _gate_outcome(verdicts)


def _write_reports(
    results: list[Any], evalsets: list[Any], out: Path, verdicts: list[Any], *, worst: int, review: int
) -> None:
    """One report per held-out set (the robustness split's under ``out/robust``), each printed up to its worst
    failures; the gate's verdict, which holds every split's checks, goes in the task's own report alone."""
    from evaluation.report import write_report
    from evaluation.scores import ROBUST

    for evalset in evalsets:
        robust = evalset.split == ROBUST
        where = out / ROBUST if robust else out
        mine = [r for r in results if r.split == evalset.split]
        write_report(mine, evalset, where, gates=None if robust else verdicts, worst=worst, review=review)
        console.print((where / "report.md").read_text().split("\n## Worst failures")[0], highlight=False, markup=False)
        console.print(
            f"reports in {where}: report.json, report.md, report.png, failures.jsonl, review.html, review.csv"
        )


def _gate_outcome(verdicts: list[Any]) -> None:
    """Say what the gate decided; exit 1 when a target failed it, or there was none to judge."""
    failed = [v for v in verdicts if not v.passed]
    for v in failed:
        for c in v.failures:
            err.print(
                f"gate failed: {v.target} {c.where} {c.name}: {c.detail} (threshold {c.threshold})",
                highlight=False,
                markup=False,
            )
    if failed or not verdicts:
        if not verdicts:
            err.print("gate: no adapter target to judge", highlight=False)
        raise typer.Exit(1)
    console.print(f"gate passed: {', '.join(v.target for v in verdicts)} (recorded in the store)")


def _stable_for_gate(store: Any, names: list[str], stable: str | None) -> str | None:
    """The version candidates are compared with: --stable, else the stable version of their alias."""
    from evaluation.run import EvalError

    if stable:
        return stable
    aliases = {n.partition("@")[0] for n in names if n != "base"}
    if len(aliases) > 1:
        raise EvalError(f"--gate with several aliases {sorted(aliases)}: name the baseline with --stable ALIAS@N")
    if not aliases:
        raise EvalError("--gate needs at least one adapter target (ALIAS@VERSION)")
    found = store.stable(aliases.pop())
    return found.ref if found else None
