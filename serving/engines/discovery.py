"""Engines found by DNS: an engines-file entry with ``discover: dns`` is one engine per address of its host.

A Kubernetes headless Service resolves to the addresses of its ready pods; as
engine pods come and go, the gateway resolves the name again every
``LORAFLEET_DISCOVERY_S`` and adds or removes engines (named
``<entry>-<address>``). A removed engine leaves routing at once; its
connections stay open for the requests still on it, then close.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from serving.engines.specs import EngineSpec

log = logging.getLogger("lorafleet.fleet")

Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (IPv4 and IPv6), sorted, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def expand(spec: EngineSpec, addresses: list[str]) -> list[EngineSpec]:
    """One engine per address of a discovered entry, each at that address, named after the entry and it."""
    assert spec.url is not None
    parts = urlsplit(spec.url)
    out = []
    for address in addresses:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        netloc = f"{host}:{parts.port}" if parts.port else host
        name = f"{spec.name}-{address.replace('.', '-').replace(':', '-')}"[:63]
        out.append(
            spec.model_copy(update={"name": name, "url": urlunsplit(parts._replace(netloc=netloc)), "discover": None})
        )
    return out


async def discovered(
    specs: list[EngineSpec], resolver: Resolver | None = None, last_good: dict[str, list[str]] | None = None
) -> list[EngineSpec]:
    """``specs`` with every discovered entry replaced by its engines now (resolved in a worker thread).

    ``last_good`` remembers each entry's addresses from its last resolution that worked: when the name does not
    resolve (a DNS hiccup), the entry keeps those engines rather than losing them all, on every gateway at once.
    """
    resolver = resolver or resolve
    known = last_good if last_good is not None else {}
    out: list[EngineSpec] = []
    for spec in specs:
        if spec.discover is None:
            out.append(spec)
            continue
        parts = urlsplit(spec.url or "")
        try:
            addresses = await asyncio.to_thread(resolver, parts.hostname or "", parts.port or 80)
            known[spec.name] = addresses
        except OSError as exc:
            if _no_such_name(exc):  # DNS answered: the name has no address (no ready pod behind the Service)
                log.warning(
                    "engine entry %s: %s has no address; none of its engines for now", spec.name, parts.hostname
                )
                addresses = known[spec.name] = []
            else:  # DNS did not answer (a timeout, a server failure): what it said last still stands
                addresses = known.get(spec.name, [])
                log.warning(
                    "engine entry %s: resolving %s failed (%s); keeping its last known engines (%d) for now",
                    spec.name,
                    parts.hostname,
                    exc,
                    len(addresses),
                )
        out.extend(expand(spec, addresses))
    return out


def _no_such_name(exc: OSError) -> bool:
    """DNS's own answer that the name has no address, as opposed to DNS not answering."""
    nodata = getattr(socket, "EAI_NODATA", None)
    return isinstance(exc, socket.gaierror) and exc.errno in (socket.EAI_NONAME, nodata)
