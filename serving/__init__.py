"""The lorafleet gateway: an OpenAI-compatible, multi-tenant front for vLLM with hot-loaded LoRA adapters.

Imports no torch, peft or trl (a test enforces it): the gateway image stays small.
"""
