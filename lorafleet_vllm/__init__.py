"""lorafleet's vLLM plugin: grouped LoRA ops for the CPU engine (``ops``, ``punica``).

Registered under vLLM's ``vllm.general_plugins`` entry point (pyproject.toml), so vLLM calls ``register`` in
every process of every engine it starts in this environment: the gateway's supervised engines, ``lorafleet
serve-engine``, and the in-process engine of ``lorafleet eval`` and the fine-tuning gate. It acts only on
the CPU platform, only on the vLLM version it was verified against, and only while
``LORAFLEET_LORA_OPS=grouped`` (the default; ``vllm`` leaves vLLM's own ops). Otherwise it says why in the
engine's log and stands aside.
"""

from __future__ import annotations

import logging
import os

VERIFIED_VLLM = "0.32.0"
CHOICES = ("grouped", "vllm")
WRAPPER = "lorafleet_vllm.punica.GroupedPunicaWrapperCPU"

log = logging.getLogger("vllm.lorafleet")  # under vLLM's logger: its handler and format


def register() -> None:
    """vLLM's plugin hook: point the CPU platform at the grouped punica wrapper, where it applies."""
    choice = os.environ.get("LORAFLEET_LORA_OPS", "grouped")
    reason = why_not(choice)
    if reason is not None:
        chosen = choice == "vllm" or reason.startswith("the platform")  # asked for, or a GPU engine: as expected
        (log.info if chosen else log.warning)("lorafleet LoRA ops stand aside: %s; vLLM's own LoRA ops run", reason)
        return
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if platform.get_punica_wrapper() != WRAPPER:
        platform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)  # type: ignore[method-assign,assignment]
        log.info("lorafleet LoRA ops: grouped (vLLM %s, CPU)", VERIFIED_VLLM)


def why_not(choice: str) -> str | None:
    """Why the grouped ops do not apply here, or ``None`` when they do."""
    if choice not in CHOICES:
        return f"LORAFLEET_LORA_OPS={choice!r} is not one of {', '.join(CHOICES)}"
    if choice == "vllm":
        return "LORAFLEET_LORA_OPS=vllm"
    import vllm

    if vllm.__version__ != VERIFIED_VLLM:
        return f"verified against vLLM {VERIFIED_VLLM}, this is {vllm.__version__}"
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"the platform is {current_platform.device_name}, not the CPU"
    return None
