"""A real tiny training run: what is trained, what is masked, and what is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contract.basemodel import sha256_of_model_dir
from contract.manifest import read_manifest
from contract.prompt import example_messages, render
from training.train import DataError, TrainConfig, build_trainer, load_rows


def test_prompt_rendering_matches_the_tokenizer_chat_template(base_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    example = {"instruction": "Make JSON for order 7.", "input": "status: shipped"}
    for messages in (
        example_messages(example),
        [{"role": "system", "content": "Be terse."}, *example_messages(example)],
    ):
        ours = render(
            tok.chat_template, messages, add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token
        )
        theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs


def test_labels_mask_the_prompt_and_keep_completion_and_eos(
    base_model: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(data=tiny_train_file, out=tmp_path / "out", base_model=str(base_model), max_steps=1)
    trainer, prompt_format, rows, _ = build_trainer(cfg, tmp_path / "trainer")
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for i in range(2):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = (
            batch["attention_mask"][i].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        )
        prompt = render(prompt_format.chat_template, example_messages(rows[i]), add_generation_prompt=True)
        prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
        kept = labels[real]
        assert (kept[:prompt_len] == -100).all(), "prompt tokens must be masked"
        completion = tok.decode(kept[prompt_len:])
        assert completion == rows[i]["output"] + tok.eos_token, "completion and its EOS must be learned"
        assert tok.decode(ids[real]) == prompt + rows[i]["output"] + tok.eos_token
        assert (labels[~real] == -100).all(), "padding is masked"
    assert tok.pad_token_id == tok.eos_token_id  # the pitfall this test guards against


def test_tiny_training_changes_lora_only_and_writes_the_artifact(tiny_adapter: Path, base_model: Path) -> None:
    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "lora_B starts at zero; training must move it"
    assert not any("lora" not in name for name in weights), "only LoRA weights are saved"
    manifest = read_manifest(tiny_adapter)
    record = json.loads((base_model / "lorafleet-model.json").read_text())
    assert manifest.base_model.sha256 == record["sha256"]
    assert sha256_of_model_dir(base_model) == record["sha256"], "the base weights must not change"
    assert manifest.metrics["train_loss_last"] < manifest.metrics["train_loss_first"]
    assert manifest.lora.rank == 8 and manifest.data.examples == 48 and len(manifest.data.sha256) == 64
    assert manifest.output_schema and manifest.output_schema["title"] == "Order"
    assert "<|im_start|>" in manifest.prompt_format.chat_template
    assert not (tiny_adapter.parent / (tiny_adapter.name + ".partial")).exists()


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "{}"}\nnot json\n{"instruction": "", "output": "{}"}\n[1]\n')
    with pytest.raises(DataError) as exc:
        load_rows(data)
    text = str(exc.value)
    assert "3 problem(s)" in text
    assert f"{data}:2: not a JSON object" in text
    assert f"{data}:3: field 'instruction' is missing or empty" in text
    assert f"{data}:4: expected a JSON object" in text


def test_cli_refuses_bad_data_before_training_and_writes_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a"}\n')
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")},
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"{data}:1: field 'output' is missing or empty" in proc.stderr
    assert not out.exists() and not (tmp_path / "adapter.partial").exists()
