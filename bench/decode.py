"""Decoder benchmark: nanoseconds per packet for the same datagrams, decoded four ways.

    python bench/decode.py [--packets N] [--width W]

1. dpkt's object graph (Ethernet -> IP -> TCP/UDP objects) after stripping VXLAN by hand,
2. `struct.unpack_from` at fixed offsets (the floor for any per-packet Python decoder),
3. collector's reference decoder `decode_datagram` (per packet, exact under truncation),
4. collector's columnar `decode_batch` over a receive-slot array (the live path).

The traffic mix: 10,000 flows, IPv4/IPv6 (80/20), TCP/UDP/ICMP, sizes 60-1500 bytes, one copy
in ten cut to 25 bytes as the seed session's PacketLength does. Prints medians of 5 runs.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import struct
import sys
import time
from pathlib import Path

import dpkt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector import build  # noqa: E402
from collector.decode import decode_batch, decode_datagram  # noqa: E402


def traffic(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    flows = []
    for _ in range(10_000):
        v6 = rng.random() < 0.2
        proto = rng.choice((build.TCP, build.TCP, build.UDP, build.ICMPV6 if v6 else build.ICMP))
        src = f"fd00::{rng.randrange(1, 65535):x}" if v6 else f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        dst = f"fd00::{rng.randrange(1, 65535):x}" if v6 else f"172.31.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        flows.append(build.FrameSpec(ip_version=6 if v6 else 4, proto=proto, src=src, dst=dst,
                                     sport=rng.randrange(1024, 65535), dport=rng.choice((443, 80, 53, 5432)),
                                     tcp_flags=build.ACK))
    frames = {}
    out = []
    for _ in range(count):
        spec = rng.choice(flows)
        size = rng.choice((0, 0, 40, 512, 1200, 1400))
        key = (spec, size)
        if key not in frames:
            frames[key] = build.mirrored_frame(
                build.FrameSpec(**{**spec.__dict__, "payload": bytes(size)})).data
        frame = frames[key]
        out.append(build.vxlan(frame[:25] if rng.random() < 0.1 else frame, vni=7159709))
    return out


def per_packet_dpkt(datagrams):
    for d in datagrams:
        eth = dpkt.ethernet.Ethernet(d[8:])
        vni = int.from_bytes(d[4:7], "big")
        ip = eth.data
        l4 = getattr(ip, "data", None)
        (vni, getattr(ip, "src", None), getattr(ip, "dst", None), getattr(ip, "p", None),
         getattr(l4, "sport", None), getattr(l4, "dport", None), getattr(ip, "len", None))


_V4 = struct.Struct("!4xI10xH2xBx2x4s4sHH")


def per_packet_struct(datagrams):
    # The floor for per-packet Python: untagged IPv4 at fixed offsets, no truncation checks.
    unpack = _V4.unpack_from
    for d in datagrams:
        if len(d) >= 46 and d[22] == 0x45:
            unpack(d, 0)


def per_packet_collector(datagrams):
    for d in datagrams:
        decode_datagram(d)


def to_slots(datagrams, width):
    buf = np.zeros((len(datagrams), width), dtype=np.uint8)
    for i, d in enumerate(datagrams):
        head = d[:width]
        buf[i, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    return buf, np.fromiter((len(d) for d in datagrams), dtype=np.int64, count=len(datagrams))


def timed(fn, *args, runs=5):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=128, help="receive slot bytes per datagram")
    parser.add_argument("--batch", type=int, default=4096, help="rows per decode_batch call")
    args = parser.parse_args()
    datagrams = traffic(args.packets)
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
          f"numpy {np.__version__} dpkt {dpkt.__version__}")
    print(f"input: {len(datagrams)} VXLAN datagrams, 10% cut to 25 bytes; slot width {args.width}")
    sample = datagrams[: min(len(datagrams), 50_000)]
    rows = {}
    rows["dpkt object graph"] = timed(per_packet_dpkt, sample) / len(sample)
    rows["struct.unpack_from (floor, no checks)"] = timed(per_packet_struct, sample) / len(sample)
    rows["collector decode_datagram"] = timed(per_packet_collector, sample) / len(sample)
    buf, lengths = to_slots(datagrams, args.width)

    def batched():
        for start in range(0, len(datagrams), args.batch):
            decode_batch(buf[start : start + args.batch], lengths[start : start + args.batch])

    rows[f"collector decode_batch ({args.batch}/call)"] = timed(batched) / len(datagrams)
    for name, seconds in rows.items():
        print(f"{name:45s} {seconds * 1e9:9.0f} ns/packet  {1 / seconds / 1e6:7.2f} M packets/s")


if __name__ == "__main__":
    main()
