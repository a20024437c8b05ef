"""The evaluation's outputs, for machines, reviewers and humans rating style.

Under ``--out``:

- ``report.json``   every score with its interval, the gate verdicts; machine-readable
- ``report.md``     the table, the gate and the worst failures, for a pull request or ticket
- ``report.png``    the targets side by side: schema-valid, exact match, field/call accuracy with 95% intervals
- ``failures.jsonl`` every failure: prompt, output, expected output, the judge's errors
- ``review.html``, ``review.csv``  N sampled prompts with each target's answer side by side,
  with empty rating columns for a human to fill in (tone, style, anything a judge cannot see)
"""

from __future__ import annotations

import csv
import html
import json
import random
from pathlib import Path
from typing import Any

from contract.judge import field_differences
from evaluation.gate import GateVerdict
from evaluation.run import EvalSet
from evaluation.scores import Scored, TargetScores

SEVERITY = {"invalid_json": 3, "truncated": 3, "schema_mismatch": 2, "valid": 1}


def write_report(
    results: list[TargetScores],
    evalset: EvalSet,
    out: Path,
    *,
    gates: list[GateVerdict] | None = None,
    worst: int = 5,
    review: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary() for r in results]
    failures = [f for r in results for f in _failures(r, evalset)]
    report = {
        "data": str(evalset.path),
        "examples": len(evalset.examples),
        "results": summaries,
        "gates": [g.as_dict() for g in gates or []],
        "failures": len(failures),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "failures.jsonl", "w", encoding="utf-8") as f:
        for failure in failures:
            f.write(json.dumps(failure, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_markdown(summaries, results, evalset, gates or [], worst))
    _chart(summaries, out / "report.png", title=f"{evalset.path.name}: {len(evalset.examples)} held-out examples")
    _review(results, evalset, out, review, seed)
    return report


def _prompt(evalset: EvalSet, i: int) -> str:
    return str(evalset.examples[i].messages[-1]["content"])


def _failures(scores: TargetScores, evalset: EvalSet) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(scores.items):
        v = s.verdict
        ok = v.outcome == "valid" and v.exact_match is not False and s.call_ok is not False
        if ok:
            continue
        example = evalset.examples[i]
        errors = list(v.errors)
        if v.parsed_ok and v.exact_match is False:
            errors += field_differences(v.parsed, json.loads(example.completion))
        if s.call_ok is False and v.parsed_ok:
            errors.append(f"call does not match any acceptable answer: {evalset.ground_truth[i]}")
        out.append(
            {
                "target": scores.target,
                "mode": scores.mode,
                "line": example.line,
                "id": example.id,
                "outcome": v.outcome,
                "field_accuracy": v.field_accuracy,
                "prompt": _prompt(evalset, i),
                "output": s.generation.text,
                "expected": example.completion,
                "errors": errors,
            }
        )
    out.sort(key=lambda f: (-SEVERITY[str(f["outcome"])], f["field_accuracy"] or 0.0))
    return out


def _pct(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.0f}–{100 * rate['high']:.0f}]"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _markdown(
    summaries: list[dict[str, Any]], results: list[TargetScores], evalset: EvalSet, gates: list[GateVerdict], worst: int
) -> str:
    calls = any("call_accuracy" in s for s in summaries)
    head = "| target | mode | n | schema-valid | exact match | field acc. |" + (" call acc. |" if calls else "")
    head += " parse | truncated | p50 s | p95 s | tok/s |"
    lines = [f"# Evaluation on `{evalset.path}`", "", head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for s in summaries:
        row = f"| {s['target']} | {s['mode']} | {s['n']} | {_pct(s['schema_valid_rate'])} | "
        row += f"{_pct(s['exact_match_rate'])} | {_num(s['field_accuracy'], '.3f')} | "
        if calls:
            row += f"{_pct(s.get('call_accuracy'))} | "
        row += f"{_pct(s['parse_rate'])} | {_pct(s['truncated_rate'])} | {_num(s['latency_p50_s'], '.2f')} | "
        row += f"{_num(s['latency_p95_s'], '.2f')} | {_num(s['tokens_per_s'], '.0f')} |"
        lines.append(row)
    lines += [
        "",
        "Rates with 95% Wilson intervals. Latency is per request as the engine saw it "
        "(offline: from arrival to last token within the batch; through a gateway: the HTTP round trip).",
    ]
    for gate in gates:
        lines += ["", f"## Gate: {gate.target} {'PASSED' if gate.passed else 'FAILED'}"]
        compared = f"Compared with stable `{gate.stable}` in this run." if gate.stable else "No stable version yet."
        lines += [compared]
        lines += ["", "| check | mode | result | detail |", "|---|---|---|---|"]
        for c in gate.checks:
            lines.append(f"| {c.name} | {c.where} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |")
    if worst > 0:
        lines += ["", f"## Worst failures (up to {worst} per target and mode; all in failures.jsonl)"]
        for r in results:
            failures = _failures(r, evalset)[:worst]
            if not failures:
                continue
            lines += ["", f"### {r.target}, {r.mode}"]
            for f in failures:
                lines += [
                    "",
                    f"- **line {f['line']}** ({f['outcome']}): {_clip(f['prompt'])}",
                    f"  - output: `{_clip(f['output'])}`",
                    f"  - expected: `{_clip(f['expected'])}`",
                    *(f"  - {_clip(e)}" for e in f["errors"][:5]),
                ]
    return "\n".join(lines) + "\n"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _chart(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("schema_valid_rate", "schema-valid"), ("exact_match_rate", "exact match")]
    if any("call_accuracy" in s for s in summaries):
        metrics.append(("call_accuracy", "call accuracy"))
    labels = [f"{s['target']}\n{s['mode']}" for s in summaries]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(summaries) + 2), 4.2))
    for k, (key, name) in enumerate(metrics):
        xs: list[float] = []
        ys: list[float] = []
        err: list[list[float]] = [[], []]
        for i, s in enumerate(summaries):
            rate = s.get(key)
            if rate is None:
                continue
            xs.append(i + (k - (len(metrics) - 1) / 2) * width)
            ys.append(100 * rate["value"])
            err[0].append(max(0.0, 100 * (rate["value"] - rate["low"])))  # rounding can put an end a hair inside
            err[1].append(max(0.0, 100 * (rate["high"] - rate["value"])))
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(range(len(summaries)), labels, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of examples (95% Wilson interval)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncols=len(metrics))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _review(results: list[TargetScores], evalset: EvalSet, out: Path, n: int, seed: int) -> None:
    picked = sorted(random.Random(seed).sample(range(len(evalset.examples)), min(n, len(evalset.examples))))
    columns = [f"{r.target} ({r.mode})" for r in results]

    def answer(s: Scored) -> str:
        return s.generation.text

    with open(out / "review.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["line", "prompt", "expected", *columns, *(f"rating: {c}" for c in columns), "notes"])
        for i in picked:
            writer.writerow(
                [
                    evalset.examples[i].line,
                    _prompt(evalset, i),
                    evalset.examples[i].completion,
                    *(answer(r.items[i]) for r in results),
                    *([""] * len(columns)),
                    "",
                ]
            )
    rows = []
    for i in picked:
        cells = "".join(
            f'<td class="{r.items[i].verdict.outcome}"><pre>{html.escape(answer(r.items[i]))}</pre>'
            f"<small>{r.items[i].verdict.outcome}</small></td>"
            for r in results
        )
        rows.append(
            f"<tr><td>{evalset.examples[i].line}</td><td>{html.escape(_prompt(evalset, i))}</td>"
            f"<td><pre>{html.escape(evalset.examples[i].completion)}</pre></td>{cells}</tr>"
        )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    (out / "review.html").write_text(
        "<!doctype html><meta charset=utf-8><title>lorafleet review sheet</title><style>"
        "body{font:14px system-ui;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top;max-width:28em}pre{white-space:pre-wrap;margin:0}"
        ".valid{background:#eefbe9}.schema_mismatch{background:#fff5d6}.invalid_json,.truncated{background:#fde8e8}"
        f"</style><h1>Review: {html.escape(str(evalset.path))}</h1><p>{len(picked)} prompts sampled with seed "
        f"{seed}; rate each answer in review.csv.</p><table><tr><th>line</th><th>prompt</th><th>expected</th>"
        f"{head}</tr>{''.join(rows)}</table>\n",
        "utf-8",
    )
