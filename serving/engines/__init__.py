"""The engine fleet: several vLLM engines (and base models) behind one gateway.

- ``router``: which engine serves a request (a pure function over a snapshot of the engines);
- ``load``: an engine's load and LoRA working set, read from vLLM's own Prometheus metrics.
"""
