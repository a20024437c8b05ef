"""The command groups of ``lorafleet``, one module each (registered in ``lorafleet.cli``)."""
