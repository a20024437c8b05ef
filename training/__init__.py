"""Training: provision base models, build the demo datasets, fine-tune LoRA adapters (``lorafleet train``)."""

import logging


class _NoOptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that its optional CPU 4-bit kernel package is missing.

    peft imports bitsandbytes whenever it is installed, so every training run
    would print it; the kernel only matters for QLoRA, which says so itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoOptionalKernelNotice())
