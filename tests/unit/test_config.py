"""Training configs: shipped ones validate; bad ones list every problem; flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_point_at_real_files(path: Path) -> None:
    cfg = load_config(path, {})
    assert (ROOT / cfg.data).is_file()
    assert cfg.eval_data is None or (ROOT / cfg.eval_data).is_file()
    assert cfg.schema_file is None or (ROOT / cfg.schema_file).is_file()
    assert cfg.task == path.stem


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "orders.yaml", {"max_steps": 3, "rank": None})
    assert cfg.max_steps == 3 and cfg.rank == 16


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: d.jsonl\nout: o\nrank: 0\nlearning_rate: -1\ncolour: red\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, {})
    text = str(exc.value)
    for needle in ("rank: Input should be greater than or equal to 1", "learning_rate:", "colour: Extra inputs"):
        assert needle in text


def test_unservable_adapter_kinds_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            {
                "data": "d",
                "out": "o",
                "dora": True,
                "modules_to_save": "lm_head",
                "targets": "q_proj,embed_tokens",
                "rank": 32,
                "max_lora_rank": 16,
            },
        )
    text = str(exc.value)
    assert "DoRA" in text and "modules_to_save" in text and "embed_tokens" in text and "rank: 32 exceeds" in text


def test_early_stopping_needs_evals() -> None:
    with pytest.raises(ConfigError, match="early_stopping: needs --eval-every"):
        load_config(None, {"data": "d", "out": "o", "early_stopping": 2})
