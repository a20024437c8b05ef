"""Merge a LoRA adapter into its base model: a plain model directory any vLLM serves as a base.

    lorafleet export var/adapters/orders/1 --out var/models/orders-merged --merge

The merge is done in fp32 and saved in bf16 safetensors with the tokenizer; the
result gets its own checksum record, which names the adapter weights it was
made from (an engine serving it for one alias version is checked against them:
``serving.engines.bases``), and is written atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from contract.basemodel import BaseModelRecord, MergedFrom, identify, install, sha256_file, sha256_of_model_dir
from contract.manifest import WEIGHTS_FILE, read_manifest


def merge(adapter_dir: Path, out: Path, base_model: str) -> BaseModelRecord:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(adapter_dir)
    base = identify(base_model)
    mismatch = manifest.base_mismatch(base.name, base.sha256)
    if mismatch:
        raise ValueError(f"{adapter_dir} was {mismatch}; set LORAFLEET_BASE_MODEL to the adapter's base")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        merged.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(staging)
        merged_from = MergedFrom(
            adapter=str(adapter_dir),
            adapter_sha256=sha256_file(Path(adapter_dir) / WEIGHTS_FILE),
            base_name=base.name,
            base_sha256=base.sha256,
        )
        record = BaseModelRecord(
            name=out.name,
            sha256=sha256_of_model_dir(staging),
            source=f"merged:{base.name}+{Path(adapter_dir)}",
            merged_from=merged_from,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install(staging, record, out)
    return record
