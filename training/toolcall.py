"""Function-calling data (glaive, BFCL) as JSON-output training rows.

    lorafleet data toolcall --source ../shared/data/toolcall --out data/toolcall

Each example becomes a chat row: the conversation up to the call, the functions
it may call (``tools``), the call as the assistant's answer
(``{"name", "arguments"}`` JSON) and, as its ``schema``, the call schema of the
function it calls (``contract.tools.call_schema``). BFCL questions whose id
number is divisible by 4 are held out of training for evaluation (``test``);
their acceptable argument values stay in BFCL's answers file, joined by ``id``.

The glaive conversations go to a file of their own (``glaive.jsonl``): the
demo adapter trains on BFCL alone, because mixing them in cost 7 points of
held-out BFCL call accuracy (glaive's calls leave out the optional arguments
BFCL's answers expect, and its multi-turn chat is not what BFCL asks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from contract.examples import jsonl_text
from contract.judge import schema_errors
from contract.tools import call_schema, json_schema_of

GLAIVE_FILE = "glaive_toolcall_en_demo.json"
BFCL_FILE = "bfcl_simple_python.jsonl"
BFCL_ANSWERS = "bfcl_simple_python_answers.jsonl"
ROLE_OF = {"human": "user", "gpt": "assistant", "observation": "tool"}


def _row(rid: str, messages: list[dict[str, str]], tools: list[dict[str, Any]], call: dict[str, Any]) -> dict | None:
    spec = next((t for t in tools if t.get("name") == call["name"]), None)
    if spec is None:
        return None
    schema = call_schema(spec)
    if schema_errors(call, schema):
        return None  # the dataset's call does not match its own spec: not worth learning
    tools = [t | {"parameters": json_schema_of(t.get("parameters", {}))} for t in tools]
    answer = {"role": "assistant", "content": json.dumps(call, ensure_ascii=False)}
    return {"id": rid, "messages": [*messages, answer], "tools": tools, "schema": schema}


def from_glaive(path: Path) -> tuple[list[dict], int]:
    """One row per distinct conversation, at its first function call; returns (rows, conversations skipped)."""
    rows, skipped, seen = [], 0, set()
    for i, conv in enumerate(json.loads(Path(path).read_text("utf-8"))):
        turns = conv["conversations"]
        first = next((j for j, t in enumerate(turns) if t["from"] == "function_call"), None)
        if first is None:
            continue
        call = json.loads(turns[first]["value"])
        if isinstance(call.get("arguments"), str):
            call["arguments"] = json.loads(call["arguments"] or "{}")
        # The conversation so far is context: its earlier assistant turns are not learned (weight 0), the call is.
        messages = [
            {"role": ROLE_OF[t["from"]], "content": t["value"]} | ({"weight": 0} if t["from"] == "gpt" else {})
            for t in turns[:first]
        ]
        row = _row(
            f"glaive_{i}", messages, json.loads(conv["tools"]), {"name": call["name"], "arguments": call["arguments"]}
        )
        key = json.dumps([row["messages"], row["tools"]], sort_keys=True) if row else None
        if row is None or key in seen:
            skipped += 1  # the call does not match its spec, or the same prefix was seen already
        else:
            seen.add(key)
            rows.append(row)
    return rows, skipped


def canonical_arguments(acceptable: dict[str, list[Any]], omit_optional: bool = False) -> dict[str, Any]:
    """BFCL lists acceptable values per argument ("" = may be omitted); the first real one is the answer.

    With ``omit_optional`` an argument BFCL lets be omitted is left out instead.
    """
    args = {}
    for name, values in acceptable.items():
        real = [v for v in values if v != ""]
        if real and not (omit_optional and "" in values):
            args[name] = real[0]
    return args


def bfcl_rows(questions: Path, answers: Path, omit_optional: bool = False) -> tuple[list[dict], int]:
    """One row per BFCL question of one category (first turn, one call); returns (rows, questions skipped)."""
    truth = {entry["id"]: entry["ground_truth"][0] for entry in _answers(answers)}
    rows: list[dict] = []
    skipped = 0
    for line in Path(questions).read_text("utf-8").splitlines():
        q = json.loads(line)
        if q["id"] not in truth:
            skipped += 1
            continue
        (name, acceptable), *_ = truth[q["id"]].items()
        call = {"name": name, "arguments": canonical_arguments(acceptable, omit_optional)}
        row = _row(q["id"], q["question"][0], q["function"], call)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


def from_bfcl(questions: Path, answers: Path, omit_optional: bool = False) -> tuple[list[dict], list[dict], int]:
    """(train rows, held-out test rows, questions skipped)."""
    rows, skipped = bfcl_rows(questions, answers, omit_optional)
    train = [r for r in rows if not is_held_out(r["id"])]
    test = [r for r in rows if is_held_out(r["id"])]
    return train, test, skipped


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def is_held_out(bfcl_id: str) -> bool:
    return int(bfcl_id.rsplit("_", 1)[1]) % 4 == 0


# The robustness split: each held-out question asked the way people ask, in words no training row uses (a test
# checks); the question itself (its numbers, names, units) is left as it is, so BFCL's answers still hold.
FRAMINGS = [
    "hey, quick one for you: {q} thanks!!",
    "I'm stuck on my homework. {q}",
    "{q} Just hand me the function call, nothing else.",
    'My colleague asked me this and I need the call for it: "{q}"',
    "Context: we are wiring a chatbot to our backend.\nTask: {q}",
    "Question from a user (answer it with one of the tools):\n\n{q}",
    "URGENT - {q}",
    "{q}\n\n(pick whichever tool fits, and fill in its arguments)",
]


def robust_rows(test: list[dict]) -> list[dict]:
    """The held-out rows phrased unlike the training ones: one framing per question, chosen by a seeded draw."""
    rng = random.Random("toolcall-robust")
    rows = []
    for row in test:
        question = row["messages"][0]["content"].strip()
        asked = rng.choice(FRAMINGS).format(q=question)
        rows.append({**row, "messages": [{"role": "user", "content": asked}, *row["messages"][1:]]})
    return rows


def write(source: Path, out: Path) -> dict[str, int]:
    """Write ``train.jsonl`` (BFCL), ``glaive.jsonl``, ``test.jsonl`` (held-out BFCL), ``robust.jsonl`` (the
    held-out questions phrased unlike training) and ``test_answers.jsonl`` (BFCL's acceptable answers for the
    held-out ids, for ``lorafleet eval --answers``) under ``out``."""
    glaive, glaive_skipped = from_glaive(source / GLAIVE_FILE)
    bfcl_train, bfcl_test, bfcl_skipped = from_bfcl(source / BFCL_FILE, source / BFCL_ANSWERS)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": bfcl_train, "glaive": glaive, "test": bfcl_test, "robust": robust_rows(bfcl_test)}
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text(jsonl_text(rows), "utf-8")
    held_out = {r["id"] for r in bfcl_test}
    answers = [a for a in _answers(source / BFCL_ANSWERS) if a["id"] in held_out]
    (out / "test_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers), "utf-8")
    return {
        "train": len(bfcl_train),
        "glaive": len(glaive),
        "test": len(bfcl_test),
        "skipped_glaive": glaive_skipped,
        "skipped_bfcl": bfcl_skipped,
    }
