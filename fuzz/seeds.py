"""Seed inputs for each fuzz target: valid, typical inputs that the fuzzer mutates from (a
coverage-guided fuzzer reaches deep states far sooner from valid input than from nothing)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from collector import build
from fuzz import hostile

ROOT = Path(__file__).resolve().parent.parent
_PORT_BYTE = {"vxlan": 0, "geneve": 2}


def datagram_seeds(count: int = 200):
    """Each hostile kind, as check_datagram reads it: port byte, slot byte, payload."""
    for kind, payload, listener in hostile.stream(7, count):
        if kind != "jumbo":
            yield bytes([_PORT_BYTE[listener], 0]) + payload


def batch_seeds(count: int = 40):
    rng = random.Random(11)
    for _ in range(count):
        listener = rng.choice(("vxlan", "geneve"))
        out = bytearray([_PORT_BYTE[listener], rng.randrange(256)])
        for _ in range(rng.randrange(1, 6)):
            frame = hostile.valid_frame(rng, payload_len=rng.randrange(0, 64))
            payload = (build.vxlan(frame, vni=rng.randrange(1 << 24)) if listener == "vxlan"
                       else build.gwlb_mirror(frame, vni=rng.randrange(1 << 24)))[:255]
            out += bytes([len(payload), rng.choice((255, rng.randrange(256)))]) + payload
        yield bytes(out)


def _pcapng_block(block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def pcapng_sample() -> bytes:
    """A section, two interfaces (one with if_tsresol 10^-9 and if_tsoffset), an Enhanced, a
    Simple and an obsolete Packet block, and an unknown block."""
    rng = random.Random(3)
    frame = hostile.valid_frame(rng)
    shb = _pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    options = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HHq", 14, 8, 5) + b"\0\0\0\0"
    idb0 = _pcapng_block(1, struct.pack("<HHI", 1, 0, 65535) + options)
    idb1 = _pcapng_block(1, struct.pack("<HHI", 101, 0, 0))
    epb = _pcapng_block(6, struct.pack("<IIIII", 0, 0x5F5, 0xE100, len(frame), len(frame)) + frame)
    spb = _pcapng_block(3, struct.pack("<I", len(frame)) + frame)
    pb = _pcapng_block(2, struct.pack("<HHIIII", 1, 0, 1, 2, len(frame), len(frame)) + frame)
    unknown = _pcapng_block(0x0BAD, b"unknown block body")
    return shb + idb0 + idb1 + epb + spb + pb + unknown + epb


def capture_seeds():
    for path in sorted((ROOT / "fixtures").glob("*.pcap")):
        yield path.read_bytes()[:4096]
    yield pcapng_sample()
    yield pcapng_sample()[:100]


def sessions_seeds():
    for path in sorted((ROOT / "fixtures" / "sessions").rglob("*.json")):
        yield path.read_bytes()


def config_seeds():
    yield (ROOT / "deploy" / "collector.toml").read_bytes()
    yield b"[serve]\nlisten = '127.0.0.1:4789'\nworkers = 2\nflush_seconds = 0.5\n"
    yield b"health=[::1]:8080\npackets=true\npacket_bytes=9000\nmin_free=1G\n"


SEEDS = {
    "datagram": datagram_seeds,
    "batch": batch_seeds,
    "capture": capture_seeds,
    "sessions": sessions_seeds,
    "config": config_seeds,
    "fastflow": batch_seeds,
    "fastcapture": capture_seeds,
}
