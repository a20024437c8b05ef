"""The gateway's HTTP edge: routes, request models, middleware, error handlers, and the relay of answers.

The only room (with ``serving.app``) that imports FastAPI or Starlette. A route checks what the client sent,
hands it to ``serving.plan`` and ``serving.engines.dispatch``, and relays the answer (``relay``).
"""
