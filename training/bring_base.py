"""Bring your own base model: a local Hugging Face directory or a GGUF file, checked before it is provisioned.

    lorafleet model pull ./my-model --name my-base [--chat-template template.jinja]
    lorafleet model pull ./my-model.Q8_0.gguf --name my-base

The model is copied (a GGUF converted to bf16 safetensors) under
``data_dir/models/<name>`` only if every check passes; otherwise nothing is
written and each problem is named with its fix:

- the weights are safetensors (a pickle can run code when loaded);
- the architecture is one vLLM serves *with LoRA adapters* (its model class
  implements ``SupportsLoRA``), read from vLLM's own model registry;
- the tokenizer has a chat template (or ``--chat-template`` gives one), and
  that template renders a user turn and an assistant turn;
- the end-of-answer token (``eos_token``) closes the assistant's turn in that
  template: training teaches the adapter to stop there and the server stops
  there, so a template that never emits it makes answers run on;
- a tokenizer that starts plain text with ``<bos>`` gets it in chat prompts too
  (the template starts with ``{{ bos_token }}``): chat prompts are tokenized
  without special tokens, so a template without it drops the ``<bos>`` the
  model was trained with;
- the sha256 of the weights is recorded, so adapters name exactly what they fit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from contract.basemodel import BaseModelRecord, install, read_record, sha256_of_model_dir
from contract.prompt import adds_bos, render
from training.base_model import ProvisionError

UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SAMPLE = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]


def bring(
    source: Path, name: str, models_dir: Path, cache_dir: Path, chat_template: Path | None = None
) -> tuple[BaseModelRecord, bool]:
    """Check ``source`` (a Hugging Face directory or a ``.gguf`` file) and provision it as ``models_dir/name``.

    Returns the record and whether anything was done (``False``: already there)."""
    target = models_dir / name
    record = read_record(target)
    if record is not None:
        return record, False
    source = source.expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        staging = Path(tmp) / "model"
        if source.is_file() and source.suffix == ".gguf":
            _from_gguf(source, staging)
            origin = f"gguf:{source.resolve()}"
        elif source.is_dir():
            _from_directory(source, staging)
            origin = f"dir:{source.resolve()}"
        else:
            raise ProvisionError(f"{source}: not a model directory or a .gguf file")
        if chat_template is not None:
            _set_chat_template(staging, chat_template)
        problems = check(staging)
        if problems:
            raise ProvisionError(
                f"{source} cannot be a base model here:\n  - " + "\n  - ".join(problems) + "\nnothing was written"
            )
        record = BaseModelRecord(name=name, sha256=sha256_of_model_dir(staging), source=origin)
        install(staging, record, target)
    return record, True


def check(model_dir: Path) -> list[str]:
    """Every reason ``model_dir`` cannot serve adapters here, each with its fix (empty: it can)."""
    problems = _check_architecture(model_dir)
    try:
        tokenizer = _tokenizer(model_dir)
    except Exception as exc:
        return [
            *problems,
            f"the tokenizer does not load ({type(exc).__name__}: {exc}); give the directory a "
            "tokenizer.json and tokenizer_config.json",
        ]
    return problems + _check_tokens(tokenizer)


def _check_architecture(model_dir: Path) -> list[str]:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return ["no config.json: is this a Hugging Face model directory?"]
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not architectures:
        return ['config.json names no architecture ("architectures": [...]); save the model with transformers']
    arch = architectures[0]
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    registered = ModelRegistry.models.get(arch)
    if registered is None:
        return [
            f"vLLM does not serve the architecture {arch}; choose a base model vLLM supports "
            "(https://docs.vllm.ai/en/latest/models/supported_models.html)"
        ]
    if not supports_lora(registered.load_model_cls()):
        return [
            f"vLLM serves {arch} but not with LoRA adapters (its model class does not implement SupportsLoRA); "
            "choose a base model whose architecture vLLM lists with LoRA support"
        ]
    return []


def _check_tokens(tokenizer: Any) -> list[str]:
    template = tokenizer.chat_template
    if not template:
        return [
            "the tokenizer has no chat template (a pretrained, not instruction-tuned, model); give one with "
            "--chat-template FILE (a Jinja template rendering `messages`, as Hugging Face's)"
        ]
    eos, bos = tokenizer.eos_token, tokenizer.bos_token
    if not eos or eos not in tokenizer.get_vocab():
        return ["the tokenizer has no end-of-answer token (eos_token); set one in tokenizer_config.json"]
    try:
        text = render(template, SAMPLE, add_generation_prompt=False, bos_token=bos or "", eos_token=eos)
    except Exception as exc:
        return [f"the chat template does not render a user and an assistant turn ({exc}); fix the template"]
    problems = []
    after = text[text.rfind("yes") + len("yes") :]
    if not after.lstrip().startswith(eos):
        problems.append(
            f"the chat template does not close the assistant's turn with the end-of-answer token {eos!r} "
            f"(it renders {after[:40]!r} after the answer): adapters would learn to stop at a token the "
            "server never stops at; end each assistant turn with {{ eos_token }}, or set eos_token to "
            "the token that ends a turn"
        )
    if adds_bos(tokenizer) and not text.startswith(bos):
        problems.append(
            f"the tokenizer starts plain text with {bos!r} but the chat template does not: chat "
            "prompts (tokenized without special tokens) would lack it; start the template with "
            "{{ bos_token }}"
        )
    return problems


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _from_directory(source: Path, staging: Path) -> None:
    if not any(source.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in UNSAFE_WEIGHTS for p in source.glob(pattern))
        what = (
            f"its weights are {', '.join(pickled[:3])} (pickle: loading it can run code)"
            if pickled
            else "it holds no *.safetensors weights"
        )
        raise ProvisionError(
            f"{source}: {what}; save it with `model.save_pretrained(dir, safe_serialization=True)`"
            " and bring that directory"
        )
    staging.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_file() and not any(path.match(pattern) for pattern in UNSAFE_WEIGHTS) and path.suffix != ".gguf":
            shutil.copy2(path, staging / path.name)


def _from_gguf(source: Path, staging: Path) -> None:
    from training.base_model import Pullable, convert_gguf

    gguf_dir = staging.parent / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / source.name).symlink_to(source.resolve())
    try:
        convert_gguf(gguf_dir, Pullable(name=source.stem, packages=(), members=(), gguf_name=source.name), staging)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ProvisionError(
            f"{source}: transformers cannot load this GGUF ({exc}); convert it elsewhere to a "
            "Hugging Face directory and bring that"
        ) from exc


def _set_chat_template(model_dir: Path, template_file: Path) -> None:
    if not template_file.is_file():
        raise ProvisionError(f"--chat-template {template_file}: no such file")
    tokenizer = _tokenizer(model_dir)
    tokenizer.chat_template = template_file.read_text("utf-8")
    tokenizer.save_pretrained(model_dir)
