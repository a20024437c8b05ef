"""Limits on a client's JSON Schema (``response_format``), checked before it reaches the engine.

A schema is compiled by vLLM's structured-output backend and validated by the
gateway's judge, so a hostile one could cost unbounded time. Refused with a 400
naming the limit: more than ``MAX_BYTES`` serialised, nesting deeper than
``MAX_DEPTH``, more than ``MAX_PROPERTIES`` properties in all, a schema that is
not valid JSON Schema, and ``pattern``/``patternProperties`` regexes that do
not compile, are too long, use what RE2 cannot run (lookarounds,
backreferences: the gateway checks answers with RE2, in linear time), or nest
quantifiers (``(a+)+``, ``(a|aa)*``: the shapes that backtrack catastrophically
in the engine's own regex handling). The check itself runs off the event loop
and is cut at ``COMPILE_TIMEOUT_S``.

A request's checks run on ``SchemaChecks``: a few threads of their own (not
the pool every other blocking call shares), at most one check per tenant at a
time, held until its thread is really done (a check cut at the timeout keeps
running). A tenant sending one heavy schema after another queues behind itself
and is refused when its own queue outlasts the budget; another tenant's check
finds a thread free.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from jsonschema import SchemaError

from contract.judge import check_schema, re2_unsupported
from serving.errors import APIError, ErrorCode

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_PROPERTIES = 1000
MAX_PATTERN = 500
COMPILE_TIMEOUT_S = 2.0
# A group that is quantified and holds a quantifier or an alternation: (x+)+ (x*)* (x|y)+ ...
NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*}]|\|)(?:[^()\\]|\\.)*\)\s*[+*{]")


async def check_client_schema_bounded(schema: Any, param: str = "response_format") -> None:
    """``check_client_schema`` off the event loop, refused when compiling takes over ``COMPILE_TIMEOUT_S``."""
    await bounded(lambda: check_client_schema(schema, param), param)


async def bounded(check: Callable[[], None], param: str) -> None:
    """Run ``check`` (schema checks that raise ``APIError``) off the event loop, cut at ``COMPILE_TIMEOUT_S``.

    The limits above keep compiling cheap; the timeout is the last line. The
    worker thread cannot be stopped, but the request is answered in bounded
    time and the loop never waits on it.
    """
    try:
        await asyncio.wait_for(asyncio.to_thread(check), COMPILE_TIMEOUT_S)
    except TimeoutError as exc:
        raise _too_slow(param) from exc


class SchemaChecks:
    """Client schema checks on ``threads`` threads of their own, one per tenant at a time (see the module's
    docstring). ``close`` when the gateway stops."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="schema-check")
        self._tenants: dict[int, asyncio.Semaphore] = {}

    async def run(self, tenant_id: int, check: Callable[[], None], param: str) -> None:
        """``check`` for ``tenant_id``, refused (``schema_refused``) when the tenant's turn and the check together
        take over ``COMPILE_TIMEOUT_S``."""
        turn = self._tenants.setdefault(tenant_id, asyncio.Semaphore(1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPILE_TIMEOUT_S
        try:
            await asyncio.wait_for(turn.acquire(), COMPILE_TIMEOUT_S)
        except TimeoutError as exc:  # its own earlier schemas are still being checked: busy, not refused
            raise APIError(
                ErrorCode.SCHEMA_CHECKS_BUSY,
                "Your earlier requests' schemas are still being checked; retry shortly.",
                param=param,
                headers={"Retry-After": "1"},
            ) from exc
        work = loop.run_in_executor(self._pool, check)
        work.add_done_callback(lambda _: turn.release())  # the tenant's turn ends when the thread is done
        work.add_done_callback(_consume)  # its outcome may be nobody's (a request cut or gone): never a warning
        try:
            await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            raise _too_slow(param) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _consume(work: asyncio.Future[None]) -> None:
    """Mark a check's outcome as seen (a check cut at the timeout, or whose request went, has no one to see it)."""
    if not work.cancelled():
        work.exception()


def _too_slow(param: str) -> APIError:
    return APIError(
        ErrorCode.SCHEMA_REFUSED,
        f"{param} schema refused: compiling it took longer than {COMPILE_TIMEOUT_S:g} s.",
        param=param,
    )


def check_client_schema(schema: Any, param: str = "response_format") -> None:
    """Raise a 400 ``schema_refused`` naming ``param`` and the limit when ``schema`` is over one."""

    def refuse(message: str) -> APIError:
        return APIError(ErrorCode.SCHEMA_REFUSED, f"{param} schema refused: {message}.", param=param)

    if not isinstance(schema, dict):
        raise refuse("it must be a JSON object")
    size = len(json.dumps(schema))
    if size > MAX_BYTES:
        raise refuse(f"{size} bytes; the limit is {MAX_BYTES}")
    properties = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise refuse(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            if "unevaluatedProperties" in node and "patternProperties" in node:
                raise refuse(
                    "'unevaluatedProperties' beside 'patternProperties' is not supported; use 'additionalProperties'"
                )
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value, refuse)
                if key == "patternProperties" and isinstance(value, dict):
                    for pattern in value:
                        _check_pattern(pattern, refuse)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    if properties > MAX_PROPERTIES:
        raise refuse(f"{properties} properties; the limit is {MAX_PROPERTIES}")
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise refuse(f"not a valid JSON Schema ({exc.message})") from exc
    _check_refs(schema, refuse)


# Keywords whose subschemas apply at the same place in the instance: a $ref cycle through them consumes
# nothing, and never ends. (properties, items and the like move into the instance: recursion through them is fine.)
SAME_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")
# Keywords whose values are data, not schemas: a "$ref" key inside them is no reference.
DATA = ("const", "enum", "default", "examples")


def _check_refs(schema: dict[str, Any], refuse: Any) -> None:
    """Every ``$ref`` points into the schema itself (a ``#/...`` pointer or a ``#name`` anchor) at something that
    exists, and none comes back to the place it started without moving into the instance (``{"$ref":
    "#/$defs/a"}`` defined as itself, directly or through ``allOf``): such a schema describes nothing, and the
    engine's grammar compiler fails on it. Recursion through a structure (a tree whose children are ``{"$ref":
    "#"}``) is fine."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                _no_loop(schema, node, refuse)
            stack.extend(v for k, v in node.items() if k not in DATA)
        elif isinstance(node, list):
            stack.extend(node)


def _no_loop(schema: dict[str, Any], start: dict[str, Any], refuse: Any) -> None:
    """Walk what ``start`` applies at its own place (its ``$ref`` target, its ``allOf``/``anyOf``/... members),
    refusing a ``$ref`` that points at nothing or a walk that comes back to a schema on its own path."""

    def walk(node: Any, path: list[int], names: list[str]) -> None:
        if not isinstance(node, dict):
            return
        if id(node) in path:
            raise refuse(f"its $ref chain loops ({' -> '.join(names)}); define what it refers to")
        path = [*path, id(node)]
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _resolve(schema, ref)
            if target is None:
                raise refuse(f"$ref {ref!r} points at nothing in the schema (only local '#...' refs resolve)")
            walk(target, path, [*names, ref])
        for keyword in SAME_PLACE:
            value = node.get(keyword)
            for member in value if isinstance(value, list) else [value]:
                walk(member, path, names)

    walk(start, [], [])


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    """The part of ``schema`` a local reference names: a JSON pointer ``#/a/b`` (percent-encoded or not) or an
    anchor ``#name``; ``None`` when there is none, or the reference is not local."""
    if ref == "#":
        return schema
    if not ref.startswith("#"):
        return None
    if not ref.startswith("#/"):
        return _anchor(schema, ref[1:])
    node: Any = schema
    for part in ref[2:].split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _anchor(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("$anchor") == name:
                return node
            stack.extend(v for k, v in node.items() if k not in DATA)
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _check_pattern(pattern: str, refuse: Any) -> None:
    if len(pattern) > MAX_PATTERN:
        raise refuse(f"a pattern of {len(pattern)} characters; the limit is {MAX_PATTERN}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise refuse(f"pattern {pattern!r} does not compile ({exc})") from exc
    unsupported = re2_unsupported(pattern)
    if unsupported is not None:  # the gateway checks answers with RE2 (linear time), which lacks a few features
        raise refuse(
            f"pattern {pattern!r} uses a feature the gateway's linear-time regex engine (RE2) lacks "
            f"({unsupported}; lookarounds and backreferences are not supported)"
        )
    if NESTED_QUANTIFIER.search(pattern):
        raise refuse(f"pattern {pattern!r} nests quantifiers, which can backtrack catastrophically")
