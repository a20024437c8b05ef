"""The recipe sweep (benchmarks/recipe_sweep.py): its recipes are valid configs; one smoke job runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import recipe_sweep
from tests.conftest import ROOT
from training import toolcall
from training.config import TrainConfig

BFCL = ROOT.parent / "shared/data/toolcall"


def test_every_recipe_is_a_valid_training_config(tmp_path: Path) -> None:
    extra = [BFCL / "bfcl_simple_python.jsonl", BFCL / "bfcl_simple_python_answers.jsonl"]
    for name in recipe_sweep.RECIPES:
        values, neftune = recipe_sweep.config_values(name, 1, extra, tmp_path)
        cfg = TrainConfig.model_validate(values)
        assert cfg.seed == 1 and cfg.out == tmp_path / f"{name}-1"
        assert neftune == recipe_sweep.RECIPES[name].get("neftune")
    combined = (tmp_path / "train+extra.jsonl").read_text().splitlines()
    shipped = (ROOT / "data/toolcall/train.jsonl").read_text().splitlines()
    assert combined[: len(shipped)] == shipped and len(combined) > len(shipped)


def test_the_omit_recipes_train_on_calls_without_the_arguments_bfcl_lets_be_omitted(tmp_path: Path) -> None:
    values, _ = recipe_sweep.config_values("omit", 0, None, tmp_path)
    rows = [json.loads(line) for line in Path(values["data"]).read_text().splitlines()]
    assert len(rows) > 290 and not any(toolcall.is_held_out(r["id"]) for r in rows)
    by_id = {r["id"]: json.loads(r["messages"][-1]["content"])["arguments"] for r in rows}
    assert by_id["simple_python_1"] == {"number": 5}
    answer_lines = (BFCL / "bfcl_simple_python_answers.jsonl").read_text().splitlines()
    answers = {a["id"]: a["ground_truth"][0] for a in map(json.loads, answer_lines)}
    for rid, args in by_id.items():
        (acceptable,) = answers[rid].values()
        assert all("" not in acceptable[name] for name in args), rid
        assert all(name in args for name, values in acceptable.items() if "" not in values), rid


def test_the_signature_prompt_shows_each_function_as_a_python_signature() -> None:
    spec = {
        "name": "geo.find",
        "description": "Find places.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Where."},
                "kinds": {"type": "array", "items": {"type": "string", "enum": ["cafe", "bar"]}},
                "limit": {"type": "integer", "description": "How many."},
            },
            "required": ["city"],
        },
    }
    text = recipe_sweep.signature_prompt([spec])
    assert text.endswith(
        "def geo.find(city: str, kinds: list[Literal['cafe', 'bar']] = None, limit: int = None):\n"
        '    """Find places.\n\n    city: Where.\n    kinds:\n    limit: How many.\n    """'
    )
    assert text.startswith("You can call the functions below.")


def test_unknown_recipes_and_missing_extra_data_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no recipe named \\['nope'\\]"):
        recipe_sweep.jobs(["shipped", "nope"], [0])
    with pytest.raises(ValueError, match="needs --extra-bfcl"):
        recipe_sweep.config_values("extra96", 0, None, tmp_path)


def test_jobs_run_seed_by_seed_so_a_time_limit_keeps_every_recipe_once() -> None:
    jobs = recipe_sweep.jobs(["r8", "shipped"], [0, 1])
    assert jobs == [("shipped", 0), ("r8", 0), ("shipped", 1), ("r8", 1)]


def test_the_table_shows_each_recipes_mean_and_every_seed() -> None:
    rows = [
        {"recipe": "a", "seed": 1, "call_accuracy": 0.5, "schema_valid": 1.0},
        {"recipe": "a", "seed": 0, "call_accuracy": 0.7, "schema_valid": 0.9},
        {"recipe": "b", "seed": 0, "call_accuracy": 0.8, "schema_valid": 0.95},
        {"recipe": "c", "seed": 0, "error": "ValueError('x')"},
    ]
    table = recipe_sweep.table(rows)
    assert "error: c seed 0" in table
    lines = [line for line in table.splitlines() if line.startswith("| a") or line.startswith("| b")]
    assert lines == ["| b | 1 | 80.0 (80.0) | 95.0 (95.0) |", "| a | 2 | 60.0 (70.0 / 50.0) | 95.0 (90.0 / 100.0) |"]


def test_a_second_run_adds_its_rows_to_the_first(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"recipe": "a", "seed": 0}\n')
    (tmp_path / "results.0.jsonl").write_text('{"recipe": "a", "seed": 1}\n')
    (tmp_path / "results.1.jsonl").write_text('{"recipe": "b", "seed": 1}\n')
    rows = recipe_sweep.merge_parts(tmp_path)
    assert [(r["recipe"], r["seed"]) for r in rows] == [("a", 0), ("a", 1), ("b", 1)]
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
