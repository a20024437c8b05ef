"""The bundled "orders" dataset is what the generator makes, valid, and its test split is truly held out."""

from __future__ import annotations

import json
import re
from pathlib import Path

from contract.judge import judge
from tests.conftest import ORDERS, orders_schema
from training import demo_data


def test_bundled_files_match_the_generator(tmp_path: Path) -> None:
    for path in demo_data.write(tmp_path, seed=0):
        assert path.read_bytes() == (ORDERS / path.name).read_bytes(), f"{path.name}: run `lorafleet data demo`"


def test_generator_is_deterministic_and_seed_dependent() -> None:
    assert demo_data.generate(0) == demo_data.generate(0)
    assert demo_data.generate(0)["train"] != demo_data.generate(1)["train"]


def test_every_output_matches_the_schema_and_the_instruction() -> None:
    schema = orders_schema()
    for split in ("train", "validation", "test"):
        for line in (ORDERS / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            verdict = judge(row["output"], schema)
            assert verdict.outcome == "valid", (split, row, verdict.errors)
            out = verdict.parsed
            for value in (out["customer"]["name"], out["customer"]["email"], out["order_id"], out["status"]):
                assert value in row["instruction"], (value, row["instruction"])


def test_test_split_holds_out_templates_and_names() -> None:
    rows = {s: [json.loads(x) for x in (ORDERS / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}
    sizes = {s: len(r) for s, r in rows.items()}
    assert sizes == {"train": 1600, "test": 200}

    def first_names(split: str) -> set[str]:
        return {json.loads(r["output"])["customer"]["name"].split()[0] for r in rows[split]}

    assert not first_names("train") & first_names("test")

    def template_of(instruction: str) -> str:
        for i, tpl in enumerate(demo_data.TEMPLATES):
            pattern = re.escape(tpl)
            for field in ("name", "email", "order_id", "status"):
                pattern = pattern.replace(re.escape("{" + field + "}"), ".+?")
            if re.fullmatch(pattern, instruction):
                return str(i)
        raise AssertionError(f"no template matches {instruction!r}")

    train_tpl = {template_of(r["instruction"]) for r in rows["train"]}
    test_tpl = {template_of(r["instruction"]) for r in rows["test"]}
    assert not train_tpl & test_tpl
    assert len(train_tpl) >= 8 and len(test_tpl) >= 2
