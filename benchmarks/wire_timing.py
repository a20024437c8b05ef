"""How long each streamed request spends inside the gateway on its first-token path, read off the wire.

    tcpdump -i lo -s 1024 -w var/gw.pcap tcp &       # as root; or only the gateway's and the engine's ports
    python -m benchmarks.gateway_overhead             # or any streamed traffic with X-Request-IDs
    python -m benchmarks.wire_timing var/gw.pcap      # --gateway-port/--engine-port if not found by themselves

The benchmark's per-request figures come from clocks in the client and in the
gateway: the client's own time can only be bounded, and a first event the
gateway reads late counts as engine time. A packet capture on the loopback
interface has neither problem. For each request id (the ``X-Request-ID`` the
client sends; the gateway's own id for vLLM ends with it, ``gw<12 hex>-<id>``)
it finds four packets:

- t1: the last packet of the client's request to the gateway,
- t2: the last packet of the gateway's request to the engine,
- t3: the engine's first event (``data:``) to the gateway,
- t4: the gateway's first event to the client,

and prints the time inside the gateway, ``(t2 - t1) + (t4 - t3)``: its
request handling (the server's read and parse, auth, routing, the body
rewrite, the engine connection) and its relay of the first event, with the
client's time and the engine's time both outside. The extra loopback hop the
gateway adds is left out (microseconds). Standard library only: a pcap file of
Ethernet (``lo``) or Linux cooked frames.
"""

from __future__ import annotations

import argparse
import re
import statistics
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REQUEST_ID = re.compile(rb"(?i)\r\nx-request-id: (?:gw[0-9a-f]{12}-)?([A-Za-z0-9._:-]+)\r\n")  # the client's part
WARM_UP = "warmup-"  # the id prefix of gateway_overhead's warm-up requests (cold code paths, first loads)
LINKTYPES = {1: 14, 113: 16}  # Ethernet (loopback), Linux cooked capture: header bytes before IP


@dataclass
class Packet:
    time: float
    src: int  # TCP ports: loopback traffic is told apart by port alone
    dst: int
    payload: bytes


@dataclass
class Leg:
    """One HTTP exchange on one connection: the request's packets, then the response's."""

    request_id: str
    sent_last: float  # the request's last packet
    first_event: float | None = None  # the response's first packet with an SSE event


@dataclass
class Timings:
    inbound: list[float] = field(default_factory=list)  # t2 - t1
    relay: list[float] = field(default_factory=list)  # t4 - t3
    total: list[float] = field(default_factory=list)
    skipped: int = 0  # warm-up requests left out


def read_pcap(path: Path) -> list[Packet]:
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
    if magic not in endian:
        raise SystemExit(f"{path}: not a pcap file (pcapng is not read: capture with tcpdump -w)")
    order = endian[magic]
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    linktype = struct.unpack(order + "I", data[20:24])[0]
    if linktype not in LINKTYPES:
        raise SystemExit(f"{path}: link type {linktype} not read; capture on lo (Ethernet) or any (cooked)")
    offset, packets = 24, []
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(order + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        ip = frame[LINKTYPES[linktype] :]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:  # IPv4 TCP only
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        if len(tcp) < 20:
            continue
        src, dst = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            packets.append(Packet(sec + frac * scale, src, dst, payload))
    return packets


def legs(packets: list[Packet], server_port: int) -> dict[str, Leg]:
    """Every request to ``server_port`` that carries a request id, by id (connections are reused in turn)."""
    found: dict[str, Leg] = {}
    current: dict[int, Leg] = {}  # client port -> the exchange in progress on that connection
    for p in packets:
        if p.dst == server_port:
            match = REQUEST_ID.search(p.payload)
            if match:
                leg = Leg(match.group(1).decode(), p.time)
                current[p.src] = found[leg.request_id] = leg
            elif p.src in current and current[p.src].first_event is None:
                current[p.src].sent_last = p.time  # the body, after the headers
        elif p.src == server_port and p.dst in current:
            leg = current[p.dst]
            if leg.first_event is None and (p.payload.startswith(b"data:") or b"\ndata:" in p.payload):
                leg.first_event = p.time
    return found


def detect_ports(packets: list[Packet]) -> tuple[int, int]:
    """(gateway port, engine port): the two ports a request id is sent to, first and second, most often."""
    seen: dict[str, list[int]] = defaultdict(list)
    for p in packets:
        match = REQUEST_ID.search(p.payload)
        if match and p.dst not in seen[match.group(1).decode()]:
            seen[match.group(1).decode()].append(p.dst)
    pairs = [(ports[0], ports[1]) for ports in seen.values() if len(ports) >= 2]  # then the response to the client
    if not pairs:
        raise SystemExit("no request id was seen twice (client to gateway, gateway to engine); give the ports")
    return max(set(pairs), key=pairs.count)


def timings(packets: list[Packet], gateway_port: int, engine_port: int, skip_prefix: str = WARM_UP) -> Timings:
    """Per request id; ids starting with ``skip_prefix`` (the benchmark's warm-up requests) are left out."""
    client, engine = legs(packets, gateway_port), legs(packets, engine_port)
    out = Timings()
    for rid, front in client.items():
        if skip_prefix and rid.startswith(skip_prefix):
            out.skipped += 1
            continue
        back = engine.get(rid)
        if back is None or front.first_event is None or back.first_event is None:
            continue
        inbound, relay = back.sent_last - front.sent_last, front.first_event - back.first_event
        out.inbound.append(inbound)
        out.relay.append(relay)
        out.total.append(inbound + relay)
    return out


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile, nearest rank (the value below which ``q`` of the values lie)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pcap", type=Path)
    parser.add_argument("--gateway-port", type=int, default=None)
    parser.add_argument("--engine-port", type=int, default=None)
    parser.add_argument("--skip-prefix", default=WARM_UP, help="leave out request ids starting with this ('': none)")
    args = parser.parse_args()
    packets = read_pcap(args.pcap)
    if args.gateway_port is None or args.engine_port is None:
        args.gateway_port, args.engine_port = detect_ports(packets)
        print(f"gateway port {args.gateway_port}, engine port {args.engine_port} (from the request ids)")
    t = timings(packets, args.gateway_port, args.engine_port, args.skip_prefix)
    if not t.total:
        raise SystemExit("no streamed request was seen on both legs: check the ports and that requests carry ids")
    skipped = f"; {t.skipped} warm-up requests ({args.skip_prefix}*) left out" if t.skipped else ""
    print(f"time inside the gateway on the first-token path, {len(t.total)} streamed requests (from the wire){skipped}")
    print(f"{'':<34} | {'p50':>7} | {'p90':>7} | {'p99':>7} | {'mean':>7}  (ms)")
    rows = (
        ("request in -> request to engine", t.inbound),
        ("engine's first event -> client", t.relay),
        ("added TTFT", t.total),
    )
    for name, values in rows:
        print(
            f"{name:<34} | {1000 * pct(values, 0.5):>7.2f} | {1000 * pct(values, 0.9):>7.2f} | "
            f"{1000 * pct(values, 0.99):>7.2f} | {1000 * statistics.fmean(values):>7.2f}"
        )


if __name__ == "__main__":
    main()
