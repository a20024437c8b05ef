"""Evaluation: score adapters on held-out data with the shared judge (``contract.judge``).

Generation runs through vLLM, the engine that serves, so the scores describe
what clients will get.
"""
