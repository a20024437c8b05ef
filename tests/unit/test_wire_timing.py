"""benchmarks/wire_timing.py reads a loopback capture: the time inside the gateway per request, from packet times."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from benchmarks import wire_timing

GATEWAY, ENGINE = 8000, 8100


def frame(src: int, dst: int, payload: bytes) -> bytes:
    ethernet = b"\x00" * 12 + b"\x08\x00"
    ip = bytes([0x45, 0]) + struct.pack("!H", 40 + len(payload)) + b"\x00" * 5 + bytes([6]) + b"\x00" * 10
    tcp = struct.pack("!HH", src, dst) + b"\x00" * 8 + bytes([0x50]) + b"\x00" * 7
    return ethernet + ip + tcp + payload


def write_pcap(path: Path, packets: list[tuple[float, int, int, bytes]]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for t, src, dst, payload in packets:
        data = frame(src, dst, payload)
        out.append(struct.pack("<IIII", int(t), round((t % 1) * 1e6), len(data), len(data)) + data)
    path.write_bytes(b"".join(out))


def request(rid: str) -> bytes:
    return f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: {rid}\r\n\r\n".encode()


def engine_id(rid: str) -> str:
    return f"gw{abs(hash(rid)) % 16**12:012x}-{rid}"  # the gateway's own id for the engine ends with the client's


def test_the_time_inside_the_gateway_is_read_per_request_from_the_four_packets(tmp_path: Path) -> None:
    pcap = tmp_path / "lo.pcap"
    write_pcap(
        pcap,
        [
            # request a on client port 50001: headers, then the body (t1 = 10.000)
            (9.9990, 50001, GATEWAY, request("a")),
            (10.000, 50001, GATEWAY, b'{"model": "a1"}'),
            (10.0005, GATEWAY, 50001, b"HTTP/1.1 200 OK\r\n\r\n"),  # response headers: not an event
            (10.002, 50100, ENGINE, request(engine_id("a"))),
            (10.0021, 50100, ENGINE, b"{}"),  # t2 = 10.0021
            (11.000, ENGINE, 50100, b"7b\r\ndata: {}\r\n\r\n"),  # t3
            (11.0007, GATEWAY, 50001, b"7b\r\ndata: {}\r\n\r\n"),  # t4
            (11.5, ENGINE, 50100, b"data: {}"),
            (11.6, GATEWAY, 50001, b"data: {}"),  # later events: ignored
            # request b on the same client connection, then on another engine connection
            (12.000, 50001, GATEWAY, request("b") + b"{}"),
            (12.001, 50101, ENGINE, request(engine_id("b")) + b"{}"),
            (13.000, ENGINE, 50101, b"data: {}"),
            (13.003, GATEWAY, 50001, b"data: {}"),
            # request c never got its first event: left out
            (14.000, 50002, GATEWAY, request("c")),
            (14.001, 50102, ENGINE, request(engine_id("c"))),
            # a warm-up request of the benchmark: left out (and counted as such)
            (15.000, 50003, GATEWAY, request("warmup-d") + b"{}"),
            (15.009, 50103, ENGINE, request(engine_id("warmup-d")) + b"{}"),
            (16.000, ENGINE, 50103, b"data: {}"),
            (16.001, GATEWAY, 50003, b"data: {}"),
        ],
    )
    packets = wire_timing.read_pcap(pcap)
    assert wire_timing.detect_ports(packets) == (GATEWAY, ENGINE)
    t = wire_timing.timings(packets, GATEWAY, ENGINE)
    assert t.inbound == pytest.approx([0.0021, 0.001], abs=2e-6)
    assert t.relay == pytest.approx([0.0007, 0.003], abs=2e-6)
    assert t.total == pytest.approx([0.0028, 0.004], abs=2e-6)
    assert t.skipped == 1
    assert len(wire_timing.timings(packets, GATEWAY, ENGINE, skip_prefix="").total) == 3  # '' keeps them all


def test_a_file_that_is_not_a_pcap_is_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "x.pcapng"
    bad.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40)
    with pytest.raises(SystemExit, match="not a pcap file"):
        wire_timing.read_pcap(bad)
