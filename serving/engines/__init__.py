"""The engines: what the gateway needs of one (``protocol``), the vLLM client (``vllm``), sending a request
with failover (``dispatch``), and several engines behind one gateway.

- ``router``: which engine serves a request (a pure function over a snapshot of the engines);
- ``load``: an engine's load and LoRA working set, read from vLLM's own Prometheus metrics;
- ``fleet``: the engines as one, with routing, health and failover; ``specs`` and ``discovery``: which engines;
- ``adapters``: which adapter versions each engine holds; ``bases``: which base model each serves.

The only room that imports aiohttp.
"""
