"""The bundled "orders" dataset is what the generator makes, valid, and its test split is truly held out."""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path

from contract.judge import judge
from tests.conftest import ORDERS, orders_schema
from training import demo_data, orders_robust

# sha256 of the first release's base train rows, validation and test split (each row's JSON, in order).
BASE_ROWS_SHA256 = "4da88a5bce2bbe798071894e6fb85b210c4d0d5865546fae719a9e233afeab24"


def _rows(split: str) -> list[dict]:
    return [json.loads(x) for x in (ORDERS / f"{split}.jsonl").read_text("utf-8").splitlines()]


def test_bundled_files_match_the_generator(tmp_path: Path) -> None:
    for path in [*demo_data.write(tmp_path, seed=0), orders_robust.write(tmp_path, seed=0)]:
        assert path.read_bytes() == (ORDERS / path.name).read_bytes(), f"{path.name}: run `lorafleet data demo`"


def test_generator_is_deterministic_and_seed_dependent() -> None:
    assert demo_data.generate(0) == demo_data.generate(0)
    assert demo_data.generate(0)["train"] != demo_data.generate(1)["train"]


def test_every_output_matches_the_schema_and_the_instruction() -> None:
    schema = orders_schema()
    for split in ("train", "validation", "test", "robust"):
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
    assert sizes == {"train": 1600 + demo_data.WIDE_ROWS, "test": 200}

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

    base = rows["train"][:1600]  # the wide rows after them have templates of their own
    assert not set(demo_data.WIDE_TEMPLATES) & set(demo_data.TEMPLATES)
    train_tpl = {template_of(r["instruction"]) for r in base}
    test_tpl = {template_of(r["instruction"]) for r in rows["test"]}
    assert not train_tpl & test_tpl
    assert len(train_tpl) >= 8 and len(test_tpl) >= 2


def test_the_base_rows_never_changed() -> None:
    """The base rows, the validation and the test split are the first release's: earlier results stay comparable."""
    digest = hashlib.sha256()
    for row in _rows("train")[:1600] + _rows("validation") + _rows("test"):
        digest.update(json.dumps(row, ensure_ascii=False).encode())
    assert digest.hexdigest() == BASE_ROWS_SHA256


def test_noise_never_touches_a_value() -> None:
    import random

    rng = random.Random(3)
    for _ in range(200):
        for tpl in demo_data.WIDE_TEMPLATES:
            noisy = demo_data.noisy(tpl, rng)
            assert [f for _, f, _, _ in string.Formatter().parse(noisy) if f] == [
                f for _, f, _, _ in string.Formatter().parse(tpl) if f
            ]


def _names(rows: list[dict]) -> set[str]:
    return {json.loads(r["output"])["customer"]["name"] for r in rows}


def test_robust_split_shares_no_template_name_or_shape_with_training() -> None:
    training = _rows("train") + _rows("validation")
    text = "\n".join(r["instruction"].lower() for r in training)

    def skeleton(tpl: str) -> str:  # the template's own words and punctuation, the values left out
        return " ".join("".join(lit for lit, *_ in string.Formatter().parse(tpl)).lower().split())

    training_skeletons = {skeleton(t) for t in demo_data.TEMPLATES + demo_data.WIDE_TEMPLATES}
    for tpl in orders_robust.TEMPLATES:
        assert skeleton(tpl) not in training_skeletons, tpl
        for literal, *_ in string.Formatter().parse(tpl):
            fragment = literal.strip(" .,;:!?()'\"<>|=-").lower()
            if len(fragment.split()) >= 3 or len(fragment) >= 10:  # not single words ("contact") or "it is"
                assert fragment not in text, f"robust template fragment {fragment!r} occurs in training"
    train_words = {word for name in _names(training) for word in name.split()}
    train_names = "\n".join(_names(training))
    robust = _rows("robust")
    assert len(robust) == orders_robust.ROBUST_ROWS
    for name in _names(robust):
        first, last = name.split(" ", 1)
        assert first not in train_words, f"robust first name {first!r} occurs in training"
        assert last not in train_names, f"robust surname {last!r} occurs in training"
    outputs = [json.loads(r["output"]) for r in training]
    train_domains = {o["customer"]["email"].split("@")[1] for o in outputs}
    assert not train_domains & set(orders_robust.DOMAINS)
    assert not any("+" in o["customer"]["email"] for o in outputs), "plus-addressing is the robust split's alone"
    robust_ids = re.compile(r"PO/\d{4}/\d{5}|\d{4}-[A-Z]{2}-\d{5}|[0-9a-f]{4}-[0-9a-f]{4}|K\d\d\.\d{4}")
    assert not any(robust_ids.fullmatch(o["order_id"]) for o in outputs)
    assert all(robust_ids.fullmatch(json.loads(r["output"])["order_id"]) for r in robust)
    kinds = {"diacritics": "[^\\x00-\\x7f]", "apostrophe": "'", "hyphen": "-", "multi-word surname": r"\S+ \S+ \S+"}
    for kind, pattern in kinds.items():
        assert any(re.search(pattern, name) for name in _names(robust)), f"no robust name with {kind}"
