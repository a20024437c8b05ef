"""contract.fit: every reason an adapter cannot be served, found from JSON headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.fit import fit_problems
from tests.conftest import make_adapter, write_safetensors

BASE = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
}
Q = "base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{ab}.weight"


def problems(path: Path, max_rank: int = 16) -> list[str]:
    return fit_problems(path, base_name="m", base_sha256="ab", base_config=BASE, max_lora_rank=max_rank)


def test_a_fitting_adapter_has_no_problems(tmp_path: Path) -> None:
    assert problems(make_adapter(tmp_path / "a")) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: (p / "extra.bin").write_bytes(b"\x80\x04pickle"), "pickle-format files ['extra.bin'] are refused"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "adapter_config.json does not parse"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\xff" * 4), "not a safetensors file (too short)"),
        (
            lambda p: write_safetensors(p / "adapter_model.safetensors", {Q.format(layer=0, ab="A"): [8, 99]}),
            "shape [8, 99], the base model needs [8, 16]",
        ),
        (
            lambda p: write_safetensors(p / "adapter_model.safetensors", {Q.format(layer=7, ab="B"): [16, 8]}),
            "layer 7, but the base model has 2 layers",
        ),
        (lambda p: write_safetensors(p / "adapter_model.safetensors", {"embed.weight": [4, 4]}), "no LoRA tensors"),
        (lambda p: (p / "lorafleet.json").unlink(), "lorafleet.json: missing"),
    ],
)
def test_each_misfit_is_named(tmp_path: Path, mutate: object, message: str) -> None:
    path = make_adapter(tmp_path / "a")
    mutate(path)  # type: ignore[operator]
    found = problems(path)
    assert any(message in p for p in found), found


def test_config_level_refusals(tmp_path: Path) -> None:
    assert problems(make_adapter(tmp_path / "r", rank=32), max_rank=16) == [
        "rank 32 exceeds the engine's max_lora_rank 16"
    ]
    found = problems(
        make_adapter(
            tmp_path / "m", modules_to_save=["lm_head"], use_dora=True, target_modules=["q_proj", "embed_tokens"]
        )
    )
    assert "target modules vLLM cannot serve as LoRA: ['embed_tokens']" in found
    assert "has modules_to_save (fully trained modules), which vLLM cannot serve" in found
    assert "is a DoRA adapter, which vLLM cannot serve" in found
    other_base = make_adapter(tmp_path / "b", base_sha256="ff")
    assert "trained on m (ff), not the base" in problems(other_base)[0]
    assert json.loads((other_base / "adapter_config.json").read_text())["r"] == 8
