"""lorafleet: fine-tune LoRA adapters and serve them, per tenant, on vLLM."""
