"""Function-calling data (glaive, BFCL) as JSON-output training rows.

    lorafleet data toolcall --source ../shared/data/toolcall --out data/toolcall

Each example becomes a chat row: the conversation up to the call, the functions
it may call (``tools``), the call as the assistant's answer
(``{"name", "arguments"}`` JSON) and, as its ``schema``, the call schema of the
function it calls (``contract.tools.call_schema``). BFCL questions whose id
number is divisible by 4 are held out of training for evaluation (``test``);
their acceptable argument values stay in BFCL's answers file, joined by ``id``.

Training BFCL rows whose numeric arguments are written out in the question
also get ``NUMBER_VARIANTS`` copies with those numbers replaced by others of
the same shape (``number_variants``): a 135M model otherwise learns numbers as
part of the phrase and miscopies unseen ones (10,000,000 → 1000000). Variants
only ever come from training ids.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from contract.judge import schema_errors
from contract.tools import call_schema, json_schema_of

GLAIVE_FILE = "glaive_toolcall_en_demo.json"
BFCL_FILE = "bfcl_simple_python.jsonl"
BFCL_ANSWERS = "bfcl_simple_python_answers.jsonl"
ROLE_OF = {"human": "user", "gpt": "assistant", "observation": "tool"}
NUMBER_VARIANTS = 2


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
        messages = [{"role": ROLE_OF[t["from"]], "content": t["value"]} for t in turns[:first]]
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


def canonical_arguments(acceptable: dict[str, list[Any]]) -> dict[str, Any]:
    """BFCL lists acceptable values per argument ("" = may be omitted); the first real one is the answer."""
    args = {}
    for name, values in acceptable.items():
        real = [v for v in values if v != ""]
        if real:
            args[name] = real[0]
    return args


def from_bfcl(questions: Path, answers: Path) -> tuple[list[dict], list[dict], int]:
    """(train rows, held-out test rows, questions skipped)."""
    truth = {entry["id"]: entry["ground_truth"][0] for entry in _answers(answers)}
    train: list[dict] = []
    test: list[dict] = []
    skipped = 0
    for line in Path(questions).read_text("utf-8").splitlines():
        q = json.loads(line)
        (name, acceptable), *_ = truth[q["id"]].items()
        row = _row(
            q["id"], q["question"][0], q["function"], {"name": name, "arguments": canonical_arguments(acceptable)}
        )
        if row is None:
            skipped += 1
            continue
        (test if is_held_out(q["id"]) else train).append(row)
    return train, test, skipped


def _spellings(value: int | float) -> list[str]:
    """How a question may write an argument's number: 2000000 as "2,000,000" or "2000000"; 25.0 as "25"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return [f"{value:,}", str(value)] if abs(value) >= 1000 else [str(value)]
    return [repr(value)]


def _new_number(value: int | float, rng: random.Random) -> int | float:
    """Another number shaped like ``value``: same digit count (years stay plausible years), same decimals."""
    if isinstance(value, float) and not value.is_integer():
        decimals = len(repr(value).split(".")[1])
        top = 10 ** len(str(int(abs(value)))) if abs(value) >= 1 else 1  # a probability stays a probability
        while (new := round(rng.uniform(0, top), decimals)) in (value, 0):
            pass
        return new
    whole = int(value)
    if 1900 <= whole <= 2100:
        lo, hi = 1950, 2035
    else:
        lo, hi = (10 ** (len(str(abs(whole))) - 1), 10 ** len(str(abs(whole))) - 1) if whole else (1, 9)
    while (new_int := rng.randint(lo, hi)) == whole:
        pass
    return float(new_int) if isinstance(value, float) else new_int


def number_variants(row: dict[str, Any], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Copies of ``row`` with each top-level numeric argument that the question spells out replaced,
    in the question and in the call alike. Rows without such arguments give none."""
    call = json.loads(row["messages"][-1]["content"])
    questions = [m["content"] for m in row["messages"][:-1] if m["role"] == "user"]
    numeric = {
        name: value
        for name, value in call["arguments"].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    spelled = {}
    for name, value in numeric.items():
        hits = [s for s in _spellings(value) if any(_occurs(s, q) for q in questions)]
        if hits and len({v for v in numeric.values() if v == value}) == 1:
            spelled[name] = hits[0]
    if not spelled:
        return []
    variants, seen = [], {json.dumps(row["messages"][:-1])}
    for k in range(count):
        arguments = dict(call["arguments"])
        replace: dict[str, str] = {}
        for name, spelling in spelled.items():
            new = _new_number(numeric[name], rng)
            arguments[name] = new
            replace[spelling] = _spellings(new)[0 if "," in spelling else -1]
        messages = [
            m | {"content": _substitute(m["content"], replace)} if m["role"] == "user" else m
            for m in row["messages"][:-1]
        ]
        answer = {"role": "assistant", "content": json.dumps(call | {"arguments": arguments}, ensure_ascii=False)}
        variant = row | {"id": f"{row['id']}~n{k + 1}", "messages": [*messages, answer]}
        if json.dumps(messages) in seen or schema_errors(json.loads(answer["content"]), row["schema"]):
            continue  # the same draw twice, or a swapped number that breaks a minimum/maximum
        seen.add(json.dumps(messages))
        variants.append(variant)
    return variants


def _number_pattern(spelling: str) -> str:
    return rf"(?<![\d.,]){re.escape(spelling)}(?![\d]|[.,]\d)"


def _occurs(spelling: str, text: str) -> bool:
    return re.search(_number_pattern(spelling), text) is not None


def _substitute(text: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        text = re.sub(_number_pattern(old), new, text)
    return text


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def is_held_out(bfcl_id: str) -> bool:
    return int(bfcl_id.rsplit("_", 1)[1]) % 4 == 0


def write(source: Path, out: Path) -> dict[str, int]:
    """Write ``train.jsonl`` (glaive + BFCL), ``test.jsonl`` (held-out BFCL) and ``test_answers.jsonl``
    (BFCL's acceptable answers for the held-out ids, for ``lorafleet eval --answers``) under ``out``."""
    glaive, glaive_skipped = from_glaive(source / GLAIVE_FILE)
    bfcl_train, bfcl_test, bfcl_skipped = from_bfcl(source / BFCL_FILE, source / BFCL_ANSWERS)
    rng = random.Random(0)
    variants = [v for row in bfcl_train for v in number_variants(row, NUMBER_VARIANTS, rng)]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", glaive + bfcl_train + variants), ("test", bfcl_test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    held_out = {r["id"] for r in bfcl_test}
    answers = [a for a in _answers(source / BFCL_ANSWERS) if a["id"] in held_out]
    (out / "test_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers), "utf-8")
    return {
        "train": len(glaive) + len(bfcl_train) + len(variants),
        "number_variants": len(variants),
        "test": len(bfcl_test),
        "skipped_glaive": glaive_skipped,
        "skipped_bfcl": bfcl_skipped,
    }
