"""Training data: every accepted shape loads, every problem is reported at once with line, field and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.examples import check
from contract.judge import judge
from tests.conftest import orders_schema
from training import toolcall

SHARED_TOOLCALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "toolcall"
ROOT = Path(__file__).resolve().parents[2]
GOOD = json.dumps({"customer": {"name": "A B", "email": "a@b.io"}, "order_id": "1", "status": "pending"})


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_shape_becomes_the_same_example(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Make it", "input": "now", "output": GOOD},
        {"prompt": "Make it\n\nnow", "completion": GOOD},
        {"messages": [{"role": "user", "content": "Make it\n\nnow"}, {"role": "assistant", "content": GOOD}]},
    ]
    for i, row in enumerate(rows):
        report = check(write_jsonl(tmp_path / f"{i}.jsonl", [row]), schema=orders_schema(), min_examples=1)
        assert not report.problems, report.problems
        (example,) = report.examples
        assert example.messages == [{"role": "user", "content": "Make it\n\nnow"}]
        assert example.completion == GOOD


def test_a_json_array_file_reports_real_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "completion": "x"},\n  {"prompt": "b"}\n]\n')
    report = check(path, min_examples=1)
    assert len(report.examples) == 1
    assert [(p.line, p.field) for p in report.errors] == [(3, "completion")]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad_status = json.dumps(json.loads(GOOD) | {"status": "lost"})
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "a", "output": GOOD},  # 1 fine
            "{oops",  # 2 malformed
            {"instruction": "", "output": GOOD},  # 3 empty field
            {"instruction": "b", "output": GOOD, "colour": "red"},  # 4 unknown field
            {"instruction": "c", "output": "```json\n{}\n```"},  # 5 not JSON under a schema
            {"instruction": "d", "output": bad_status},  # 6 schema violation
            {"instruction": "a", "output": GOOD},  # 7 duplicate of 1
            {"messages": [{"role": "user", "content": "x"}]},  # 8 no answer
            {"text": "hi"},  # 9 unknown shape
        ],
    )
    report = check(path, schema=orders_schema())
    found = {(p.line, p.field): str(p) for p in report.errors}
    assert set(found) == {
        (2, None),
        (3, "instruction"),
        (4, "colour"),
        (5, "output"),
        (6, "output"),
        (7, None),
        (8, "messages"),
        (9, None),
    }
    assert "$.status" in found[(6, "output")]
    assert "duplicate of line 1" in found[(7, None)]
    assert all(f"{path}:" in text and "fix:" in text for text in found.values())
    assert [p.message for p in report.warnings] == ["only 1 usable examples"]


def test_too_long_examples_are_errors(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "x " * 50, "completion": "y"}, {"prompt": "x", "completion": "y"}]
    )
    report = check(path, token_length=lambda e: len(e.messages[0]["content"]), max_length=20, min_examples=1)
    assert len(report.examples) == 1
    assert "over max_length 20" in str(report.errors[0]) and report.errors[0].line == 1


@pytest.mark.skipif(not SHARED_TOOLCALL.is_dir(), reason="../shared/data/toolcall is not beside the checkout")
def test_toolcall_conversion_is_bundled_valid_and_holds_out_bfcl(tmp_path: Path) -> None:
    counts = toolcall.write(SHARED_TOOLCALL, tmp_path)
    for name in ("train.jsonl", "glaive.jsonl", "test.jsonl", "robust.jsonl", "test_answers.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "toolcall" / name).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    glaive = [json.loads(x) for x in (tmp_path / "glaive.jsonl").read_text().splitlines()]
    assert counts["glaive"] == len(glaive) > 100 and all(r["id"].startswith("glaive_") for r in glaive)
    assert all(r["id"].startswith("simple_python_") for r in train)
    test = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert counts["train"] == len(train) and counts["test"] == len(test) >= 90
    assert all(toolcall.is_held_out(r["id"]) for r in test)
    answers = [json.loads(x)["id"] for x in (tmp_path / "test_answers.jsonl").read_text().splitlines()]
    assert answers == [r["id"] for r in test]
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    for row in train + glaive + test:
        assert judge(row["messages"][-1]["content"], row["schema"]).outcome == "valid"
    for name in ("train.jsonl", "glaive.jsonl"):
        assert not check(tmp_path / name).problems
    robust = [json.loads(x) for x in (tmp_path / "robust.jsonl").read_text().splitlines()]
    assert [r["id"] for r in robust] == [r["id"] for r in test], "BFCL's answers join the robust split by id"
    training = "\n".join(m["content"].lower() for r in train + glaive for m in r["messages"])
    framed = 0
    for row, held in zip(robust, test, strict=True):
        assert row["messages"][1:] == held["messages"][1:] and row["tools"] == held["tools"]
        asked, question = row["messages"][0]["content"], held["messages"][0]["content"]
        assert asked != question
        framed += 1
        for literal in asked.replace(question, "\0").split("\0"):
            fragment = literal.strip(' .,:!?"\n-()').lower()
            assert len(fragment) < 12 or fragment not in training, f"{fragment!r} occurs in training"
    assert framed == len(test)


def test_bfcl_ground_truth_becomes_one_canonical_call() -> None:
    args = toolcall.canonical_arguments({"base": [10], "unit": ["", "units"], "z": [""]})
    assert args == {"base": 10, "unit": "units"}
    args = toolcall.canonical_arguments({"base": [10], "unit": ["", "units"], "z": [""]}, omit_optional=True)
    assert args == {"base": 10}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _call(name: str, arguments: str) -> dict[str, object]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_openai_chat_rows_learn_every_assistant_turn_unless_weight_0(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "weight": 0},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [_call("get_weather", '{"city": "Oslo"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 3}'},
            {"role": "assistant", "content": "3 °C in Oslo."},
        ],
        "tools": [WEATHER],
        "parallel_tool_calls": False,
    }
    report = check(write_jsonl(tmp_path / "chat.jsonl", [row]), min_examples=1)
    assert not report.problems, report.problems
    call, answer = report.examples
    assert json.loads(call.completion) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert [m["role"] for m in call.messages] == ["system", "user", "assistant", "user"]
    assert answer.completion == "3 °C in Oslo."
    # the earlier call is in the history as the gateway reads a client's earlier tool_calls back
    assert answer.messages[4] == {"role": "assistant", "content": call.completion}
    assert call.tools == [WEATHER["function"]] == answer.tools


@pytest.mark.parametrize(
    ("turn", "field"),
    [
        ({"role": "assistant", "content": "x", "weight": 2}, "messages[1].weight"),
        (
            {"role": "assistant", "tool_calls": [_call("get_weather", "{nope")]},
            "messages[1].tool_calls[0].function.arguments",
        ),
        ({"role": "assistant", "tool_calls": [_call("launch", "{}")]}, "messages[1].tool_calls[0].function.name"),
        (
            {"role": "assistant", "tool_calls": [_call("get_weather", "{}")]},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [_call("get_weather", '{"city": "A"}')] * 2},
            "messages[1].tool_calls",
        ),
        ({"role": "assistant", "content": "x", "weight": 0}, "messages"),
        ({"role": "user", "content": "x", "weight": 1}, "messages[1].weight"),
    ],
)
def test_bad_openai_chat_turns_name_their_field(tmp_path: Path, turn: dict[str, object], field: str) -> None:
    row = {"messages": [{"role": "user", "content": "Weather?"}, turn], "tools": [WEATHER]}
    report = check(write_jsonl(tmp_path / "bad.jsonl", [row]), min_examples=1)
    assert not report.examples
    assert [(p.line, p.field) for p in report.errors] == [(1, field)], report.errors
