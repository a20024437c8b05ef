"""The adapter-artifact contract shared by training, evaluation and serving.

Everything here is plain Python (pydantic, jinja2, jsonschema): no torch, so the
gateway can import it and stay small. It defines

- ``manifest``: what an adapter directory holds and what it was trained with;
- ``store``: the versioned adapter store, written atomically;
- ``prompt``: how an example becomes chat messages and a prompt string;
- ``examples``: reading and checking example files (training and evaluation data);
- ``tools``: function specs as call schemas, and how tools enter the prompt;
- ``judge``: the one function that decides whether an output is valid JSON,
  matches its schema, was truncated, and how many fields are right;
- ``settings``: where data, models and adapters live.
"""
