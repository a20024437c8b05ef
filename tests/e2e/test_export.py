"""`lorafleet export --merge`: the merged model answers like base + adapter, as a plain model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from contract.basemodel import sha256_of_model_dir
from training.export import merge


def test_merged_model_matches_base_plus_adapter(tiny_adapter: Path, base_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    record = merge(tiny_adapter, out, str(base_model))
    assert record.sha256 == sha256_of_model_dir(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "adapter_config.json").exists()

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Create a JSON record: customer Ana Silva", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(tiny_adapter))(ids).logits
    assert torch.allclose(merged, peft, atol=0.15), (merged - peft).abs().max()


def test_merge_refuses_an_adapter_of_another_base(tiny_adapter: Path, tmp_path: Path) -> None:
    import shutil

    import pytest

    other = tmp_path / "other-base"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not the same weights")
    with pytest.raises(ValueError, match="was trained on"):
        merge(tiny_adapter, tmp_path / "out", str(other))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    shutil.rmtree(other)


def test_vllm_serves_the_merged_model_as_a_base(tiny_adapter: Path, base_model: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    import httpx

    from lorafleet.launch import free_port

    out = tmp_path / "merged"
    merge(tiny_adapter, out, str(base_model))
    port = free_port()
    log = (tmp_path / "vllm.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(out),
            "--served-model-name",
            "merged",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--max-model-len",
            "1024",
        ],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "merged",
                "messages": [
                    {
                        "role": "user",
                        "content": "Create a JSON record: customer Ana Silva (ana@shop.io), order 777, status shipped.",
                    }
                ],
                "max_tokens": 40,
                "temperature": 0,
            },
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
