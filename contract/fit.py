"""Can this engine serve this adapter? Every check, before a byte reaches vLLM.

One function, ``fit_problems``, used wherever an adapter enters service: the
gateway before loading, the admin API and ``lorafleet adapters publish`` before
publishing. It reads only JSON: the manifest, ``adapter_config.json``, the
safetensors header (never the tensors, and never a pickle), and the base
model's ``config.json``.

Checks: weights are safetensors (any pickle-format file is refused unread), the
adapter config parses, the adapter was trained on these base weights (sha256),
its rank fits the engine's ``max_lora_rank``, its target modules are linear
layers vLLM serves as LoRA, it has no ``modules_to_save`` and is not DoRA, and
every LoRA tensor's shape fits the base model's layer sizes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from contract.manifest import CONFIG_FILE, WEIGHTS_FILE, ManifestError, read_manifest

SUPPORTED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
MAX_HEADER_BYTES = 100 << 20
LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def fit_problems(
    adapter_dir: Path, *, base_name: str, base_sha256: str, base_config: dict[str, Any] | None, max_lora_rank: int
) -> list[str]:
    """Every reason the adapter in ``adapter_dir`` cannot be served; empty when it can."""
    adapter_dir = Path(adapter_dir)
    pickles = sorted(p.name for p in adapter_dir.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return [f"pickle-format files {pickles} are refused (never unpickled): save with safetensors"]
    try:
        manifest = read_manifest(adapter_dir)
    except ManifestError as exc:
        return [str(exc)]
    problems = []
    mismatch = manifest.base_mismatch(base_name, base_sha256)
    if mismatch:
        problems.append(mismatch)
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text("utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        return [*problems, f"{CONFIG_FILE} does not parse: {exc}"]
    rank = config.get("r", manifest.lora.rank)
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"{CONFIG_FILE}: r={rank!r} is not a positive integer")
        rank = None
    elif rank > max_lora_rank:
        problems.append(f"rank {rank} exceeds the engine's max_lora_rank {max_lora_rank}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = sorted(set(targets) - SUPPORTED_TARGETS)
    if unsupported:
        problems.append(f"target modules vLLM cannot serve as LoRA: {unsupported}")
    if config.get("modules_to_save"):
        problems.append("has modules_to_save (fully trained modules), which vLLM cannot serve")
    if config.get("use_dora"):
        problems.append("is a DoRA adapter, which vLLM cannot serve")
    try:
        header = safetensors_header(adapter_dir / WEIGHTS_FILE)
    except ValueError as exc:
        return [*problems, f"{WEIGHTS_FILE}: {exc}"]
    if base_config is not None and isinstance(rank, int):
        problems += _shape_problems(header, base_config, rank)
    return problems


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (names, dtypes, shapes), read without loading a tensor."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    return header


def _shape_problems(header: dict[str, Any], base: dict[str, Any], rank: int) -> list[str]:
    hidden = base.get("hidden_size")
    layers = base.get("num_hidden_layers")
    heads = base.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(layers, int) and isinstance(heads, int)):
        return []  # not a config this check understands; vLLM will check on load
    head_dim = base.get("head_dim") or hidden // heads
    kv = (base.get("num_key_value_heads") or heads) * head_dim
    inter = base.get("intermediate_size", 0)
    # (input features, output features) of each target module
    sizes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    problems = []
    lora_tensors = 0
    for name, info in header.items():
        match = LORA_KEY.search(name)
        if not match:
            continue
        lora_tensors += 1
        layer, module, ab = int(match[1]), match[2], match[3]
        shape = info.get("shape") if isinstance(info, dict) else None
        if layer >= layers:
            problems.append(f"{name}: layer {layer}, but the base model has {layers} layers")
        elif module in sizes and shape is not None:
            fan_in, fan_out = sizes[module]
            want = [rank, fan_in] if ab == "A" else [fan_out, rank]
            if list(shape) != want:
                problems.append(f"{name}: shape {list(shape)}, the base model needs {want}")
        if len(problems) >= 5:
            problems.append("(further shape problems not listed)")
            break
    if lora_tensors == 0:
        problems.append("no LoRA tensors (…layers.N.self_attn|mlp.<module>.lora_A|B.weight) in the weights")
    return problems


def base_config(base_model_path: str) -> dict[str, Any] | None:
    path = Path(base_model_path) / "config.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def problems_on_its_base(source: Path, models_dir: Path, default_base: str, max_lora_rank: int) -> list[str]:
    """``fit_problems`` of the adapter at ``source`` against the base it was trained on when that is provisioned
    under ``models_dir``, else against ``default_base`` (a path); none to find when neither is a local directory
    (a hub id: the engine checks it when it loads). Raises ``ManifestError`` for an adapter without a manifest."""
    from contract.basemodel import identify, provisioned

    own = read_manifest(source).base_model
    base_path = str(provisioned(models_dir, own.name, own.sha256) or default_base)
    if not Path(base_path).is_dir():
        return []
    base = identify(base_path)
    return fit_problems(
        source,
        base_name=base.name,
        base_sha256=base.sha256,
        base_config=base_config(base_path),
        max_lora_rank=max_lora_rank,
    )
