"""contract.fit on a real trained adapter and the real base model (every misfit on made-up ones: tests/unit/)."""

from __future__ import annotations

from pathlib import Path

from contract.basemodel import identify
from contract.fit import base_config, fit_problems


def test_the_trained_adapter_fits_the_real_base_model(tiny_adapter: Path, base_model: Path) -> None:
    base = identify(str(base_model))
    found = fit_problems(
        tiny_adapter,
        base_name=base.name,
        base_sha256=base.sha256,
        base_config=base_config(str(base_model)),
        max_lora_rank=16,
    )
    assert found == []
    # The same adapter on a model of other sizes is refused by shape.
    other = dict(base_config(str(base_model)) or {}, hidden_size=1024, num_attention_heads=16, head_dim=64)
    shapes = fit_problems(
        tiny_adapter, base_name=base.name, base_sha256=base.sha256, base_config=other, max_lora_rank=16
    )
    assert shapes and "the base model needs" in shapes[0]
