"""Real tiny training runs: what is trained, what is masked, what is written, and that runs are repeatable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contract.basemodel import sha256_of_model_dir
from contract.manifest import read_manifest
from contract.prompt import example_messages, render, with_tools
from tests.conftest import ORDERS, ROOT
from training.config import TrainConfig
from training.train import prepare, render_prompt, train


def tiny_config(data: Path, out: Path, **extra: object) -> TrainConfig:
    values = {
        "data": data,
        "out": out,
        "rank": 4,
        "alpha": 8,
        "max_steps": 3,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_length": 160,
        "log_every": 1,
        "val_fraction": 0.0,
    }
    return TrainConfig.model_validate(values | extra)


def test_prompt_rendering_matches_the_tokenizer_chat_template(each_base: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(each_base)
    example = {"instruction": "Make JSON for order 7.", "input": "status: shipped"}
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}]
    for messages in (
        example_messages(example),
        [{"role": "system", "content": "Be terse."}, *example_messages(example)],
        with_tools(example_messages(example), tools),
    ):
        ours = render(
            tok.chat_template, messages, add_generation_prompt=True, bos_token=tok.bos_token, eos_token=tok.eos_token
        )
        theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs


def test_labels_mask_the_prompt_and_keep_completion_and_eos(
    each_base: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    """The train/serve identity: the tokens trained on are the prompt exactly as served (one <bos> where the model
    has one), then the completion and the end-of-answer token, and only those two are learned."""
    prepared = prepare(tiny_config(tiny_train_file, tmp_path / "out"), str(each_base), tmp_path / "staging")
    trainer, examples = prepared.trainer, prepared.train_examples
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for i in range(2):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = batch["attention_mask"][i].bool() if "attention_mask" in batch else torch.ones_like(ids).bool()
        prompt = render_prompt(prepared.prompt_format, examples[i])
        prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
        kept = labels[real]
        assert (kept[:prompt_len] == -100).all(), "prompt tokens must be masked"
        assert tok.decode(kept[prompt_len:]) == examples[i].completion + tok.eos_token, "completion and EOS learned"
        assert tok.decode(ids[real]) == prompt + examples[i].completion + tok.eos_token
        assert (labels[~real] == -100).all(), "padding is masked"
        if tok("x")["input_ids"][:1] == [tok.bos_token_id]:  # a model that needs <bos>: exactly one, at the start
            assert ids[real].tolist().count(tok.bos_token_id) == 1 and prompt.startswith(tok.bos_token)
    if "SmolLM2" in str(each_base):
        assert tok.pad_token_id == tok.eos_token_id  # the pitfall this test guards against: EOS learned anyway


def test_tiny_training_changes_lora_only_and_writes_the_artifact(tiny_adapter: Path, base_model: Path) -> None:
    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "lora_B starts at zero; training must move it"
    assert all("lora_A" in name or "lora_B" in name for name in weights), "only LoRA tensors are saved"
    manifest = read_manifest(tiny_adapter)
    record = json.loads((base_model / "lorafleet-model.json").read_text())
    assert manifest.base_model.sha256 == record["sha256"]
    assert sha256_of_model_dir(base_model) == record["sha256"], "the base weights must not change"
    m = manifest.metrics
    assert m["train_loss_last"] is not None and m["train_loss_first"] is not None
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["steps"] == 6 and m["tokens_seen"] > 0 and m["tokens_per_second"] > 0
    assert manifest.lora.rank == 8 and manifest.data.examples == 48 and len(manifest.data.sha256) == 64
    assert manifest.split["train"] == 48 and manifest.split["validation"] == 0
    assert set(manifest.library_versions) == {"torch", "transformers", "peft", "trl"}
    assert manifest.output_schema and manifest.output_schema["title"] == "Order"
    assert "<|im_start|>" in manifest.prompt_format.chat_template
    lines = [json.loads(x) for x in (tiny_adapter / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]
    assert (tiny_adapter / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not (tiny_adapter.parent / (tiny_adapter.name + ".partial")).exists()


def test_same_data_config_and_seed_give_identical_weights(
    base_model: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        train(tiny_config(tiny_train_file, out, dropout=0.1), str(base_model))
    a, b = (load_file(out / "adapter_model.safetensors") for out in outs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw
    )  # type: ignore[call-overload]


def test_a_killed_run_resumes_from_its_last_checkpoint(base_model: Path, tiny_train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = [
        "train",
        "--data",
        str(tiny_train_file),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--val-fraction",
        "0",
        "--max-length",
        "160",
    ]
    env = os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = out.with_name("adapter.partial") / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("checkpoint-4")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a finished-looking adapter"

    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = read_manifest(out)
    assert manifest.metrics["steps"] == 8
    assert not out.with_name("adapter.partial").exists()


def test_ctrl_c_checkpoints_ends_the_announcement_and_resume_publishes(
    base_model: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    """``train --publish`` announces its progress in the store; SIGINT stops it cleanly; ``--resume`` finishes."""
    from contract.store import AdapterStore

    out, store = tmp_path / "runs" / "tiny", AdapterStore(tmp_path / "adapters")
    args = [
        "train",
        "--data",
        str(tiny_train_file),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--val-fraction",
        "0",
        "--max-length",
        "160",
        "--publish",
        "tiny",
    ]
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path), "LORAFLEET_BASE_MODEL": str(base_model)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    status = None
    while not (status and status.get("step")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        status = store.training("tiny")
        time.sleep(0.2)
    assert status is not None and status["max_steps"] == 8 and status["eta_s"] >= 0 and status["tokens_per_s"] > 0
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "--resume" in output and store.training("tiny") is None and store.latest("tiny") is None
    checkpoints = list((out.with_name("tiny.partial") / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the stop saves a checkpoint"
    stopped_at = max(int(c.name.rsplit("-", 1)[1]) for c in checkpoints)
    assert 1 <= stopped_at < 8

    done = subprocess.run(
        [sys.executable, "-m", "lorafleet", *args, "--resume"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    published = store.latest("tiny")
    assert published is not None and published.manifest().metrics["steps"] == 8
    assert store.training("tiny") is None


def test_qlora_on_the_cpu_warns_and_writes_a_plain_lora_adapter(
    base_model: Path, tiny_train_file: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("the CPU warning is only given without a GPU")
    with pytest.warns(UserWarning, match="QLoRA on the CPU works but is much slower"):
        manifest = train(tiny_config(tiny_train_file, tmp_path / "q", qlora=True, max_steps=2), str(base_model))
    assert manifest.hyperparameters["qlora"] is True and manifest.metrics["steps"] == 2
    weights = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert weights and all("lora_A" in name or "lora_B" in name for name in weights)


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu(base_model: Path, tiny_train_file: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    manifest = train(tiny_config(tiny_train_file, tmp_path / "q", qlora=True), str(base_model))
    assert manifest.metrics["steps"] == 3


def test_two_process_data_parallel_run_on_the_cpu(tiny_train_file: Path, tmp_path: Path) -> None:
    """The same command under torchrun: DDP over gloo; process 0 alone writes the artifact."""
    out = tmp_path / "ddp"
    env = os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "lorafleet",
            "train",
            "--data",
            str(tiny_train_file),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--val-fraction",
            "0",
            "--max-length",
            "160",
            "--log-every",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # Two processes with 2 examples each: one step covers 4 of the 48 examples.
    assert first["epoch"] == pytest.approx(4 / 48)
    assert read_manifest(out).metrics["steps"] == 2
    assert proc.stdout.count("adapter task") == 1, "only process 0 reports"


# The CLI checks the provisioned base model first: these run where it is (the e2e lane).
def test_cli_refuses_bad_data_before_training_and_writes_nothing(tmp_path: Path, base_model: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a"}\nnot json\n')
    out = tmp_path / "adapter"
    proc = run_cli("train", "--data", str(data), "--out", str(out))
    assert proc.returncode == 2
    assert f"{data}:1: error: field 'output': missing" in proc.stderr
    assert f"{data}:2: error: not valid JSON" in proc.stderr
    assert "--skip-invalid" in proc.stderr
    assert not out.exists() and not (tmp_path / "adapter.partial").exists()


def test_resume_without_a_checkpoint_says_so(tmp_path: Path, base_model: Path) -> None:
    proc = run_cli("train", "--data", str(ORDERS / "train.jsonl"), "--out", str(tmp_path / "x"), "--resume")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
