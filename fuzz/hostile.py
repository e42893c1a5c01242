"""Hostile mirror datagrams, by kind, from a seeded random generator.

Each kind is a function `rng -> (payload, listener)` where listener is "vxlan" (UDP 4789) or
"geneve" (UDP 6081). They start from valid AWS-shaped frames (`collector.build`) and break
them the ways a hostile or broken sender would: wrong flags, headers cut anywhere, length
fields that lie, tunnels inside tunnels, IPv4 options and IPv6 extension chains, nothing at
all, and 9000-byte jumbo frames. The same generators feed the hypothesis properties
(tests/test_fuzz_datagrams.py), the seed corpus of the coverage-guided fuzzer and the
million-datagram run against a live `serve` (fuzz/hostile_serve.py).
"""

from __future__ import annotations

import random
import struct

from collector import build

JUMBO = 9000  # the largest frame a VPC carries (jumbo MTU 9001)


def _addr(rng: random.Random, version: int) -> str:
    if version == 4:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    return ":".join(f"{rng.randrange(65536):x}" for _ in range(8))


def valid_frame(rng: random.Random, payload_len: int | None = None) -> bytes:
    """An inner Ethernet frame as a mirrored instance sends it."""
    version = rng.choice((4, 6))
    proto = rng.choice((build.TCP, build.UDP, build.ICMPV6 if version == 6 else build.ICMP))
    size = rng.randrange(0, 200) if payload_len is None else payload_len
    spec = build.FrameSpec(
        ip_version=version, proto=proto, src=_addr(rng, version), dst=_addr(rng, version),
        sport=rng.randrange(65536), dport=rng.randrange(65536), tcp_flags=rng.randrange(0x200),
        icmp_type=rng.randrange(256), icmp_code=rng.randrange(256),
        vlans=tuple(rng.randrange(4096) for _ in range(rng.choice((0, 0, 0, 1, 2)))),
        ttl=rng.randrange(256), ident=rng.randrange(65536), payload=rng.randbytes(size))
    return build.mirrored_frame(spec).data


def encapsulate(rng: random.Random, frame: bytes) -> tuple[bytes, str]:
    """`frame` as AWS sends it: VXLAN (mirror target ENI/NLB) or GENEVE-VXLAN (GWLB)."""
    vni = rng.randrange(1 << 24)
    if rng.random() < 0.7:
        return build.vxlan(frame, vni=vni), "vxlan"
    return build.gwlb_mirror(frame, vni=vni, source_port=rng.randrange(65536)), "geneve"


def valid(rng):
    return encapsulate(rng, valid_frame(rng))


def random_bytes(rng):
    return rng.randbytes(rng.choice((rng.randrange(0, 64), rng.randrange(0, 1500)))), \
        rng.choice(("vxlan", "geneve"))


def bit_flips(rng):
    data, listener = valid(rng)
    data = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data), listener


def byte_splat(rng):
    """Random bytes written over a header-sized window: structure mostly kept."""
    data, listener = valid(rng)
    data = bytearray(data)
    at = rng.randrange(min(len(data), 120))
    width = rng.randrange(1, 9)
    data[at : at + width] = rng.randbytes(width)
    return bytes(data), listener


def wrong_flags(rng):
    frame = valid_frame(rng)
    vni = rng.randrange(1 << 24)
    choice = rng.randrange(4)
    if choice == 0:  # VXLAN I flag clear, or every other flag set
        return build.vxlan(frame, vni=vni, flags=rng.choice((0x00, 0xF7, 0xFF, 0x0C, 0x80))), "vxlan"
    if choice == 1:  # reserved fields non-zero
        return build.vxlan(frame, vni=vni, reserved=rng.randbytes(3), reserved_low=rng.randrange(256)), "vxlan"
    if choice == 2:  # GENEVE version 1-3, O/C bits, unknown protocol
        header = bytearray(build.gwlb_mirror(frame, vni=vni))
        header[0] |= rng.randrange(1, 4) << 6
        header[1] = rng.randrange(256)
        return bytes(header), "geneve"
    return build.geneve(frame, vni=vni, protocol=rng.choice((0x6558, 0x0800, 0x86DD, 0x8847, 0xFFFF))), "geneve"


def cut_headers(rng):
    data, listener = valid(rng)
    return data[: rng.randrange(0, min(len(data), 140) + 1)], listener


def absurd_lengths(rng):
    """Length fields that lie: IPv4 total length / IHL, IPv6 payload length, UDP length, TCP
    data offset, GENEVE option length, all set to extremes."""
    version = rng.choice((4, 6))
    l4 = build.udp(rng.randbytes(rng.randrange(0, 64))) if rng.random() < 0.5 else build.tcp(rng.randbytes(8))
    proto = build.UDP if len(l4) >= 8 and l4[4:6] == struct.pack("!H", len(l4)) else build.TCP
    l4 = bytearray(l4)
    if proto == build.UDP:
        l4[4:6] = struct.pack("!H", rng.choice((0, 1, 7, 8, 65535, rng.randrange(65536))))
    elif len(l4) > 12:
        l4[12] = rng.choice((0x00, 0x10, 0x40, 0xF0))
    if version == 4:
        packet = bytearray(build.ipv4(bytes(l4), proto=proto,
                                      total_length=rng.choice((0, 1, 19, 20, 65535, rng.randrange(65536)))))
        if rng.random() < 0.5:
            packet[0] = 0x40 | rng.choice((0, 1, 4, 15))
    else:
        packet = bytearray(build.ipv6(bytes(l4), next_header=proto))
        packet[4:6] = struct.pack("!H", rng.choice((0, 1, 65535, rng.randrange(65536))))
    frame = build.ethernet(bytes(packet), ethertype=build.ETH_IPV4 if version == 4 else build.ETH_IPV6)
    if rng.random() < 0.3:  # GENEVE whose option length runs past the datagram
        data = bytearray(build.gwlb_mirror(frame, vni=rng.randrange(1 << 24)))
        data[0] = (data[0] & 0xC0) | 0x3F
        return bytes(data), "geneve"
    return encapsulate(rng, frame)


def nested_tunnels(rng):
    """Tunnels inside the mirrored frame (VXLAN in VXLAN, GENEVE in VXLAN, GWLB in GWLB):
    the customer's own tunnel is payload, and depth must not matter."""
    frame = valid_frame(rng)
    for _ in range(rng.randrange(1, 6)):
        inner = build.vxlan(frame, vni=rng.randrange(1 << 24)) if rng.random() < 0.5 else \
            build.geneve(frame, vni=rng.randrange(1 << 24), protocol=0x6558)
        port = build.VXLAN_PORT if inner[0] == 0x08 else 6081
        frame = build.ethernet(build.ipv4(build.udp(inner, dport=port), proto=build.UDP))
    if rng.random() < 0.5:
        return build.vxlan(frame, vni=rng.randrange(1 << 24)), "vxlan"
    return build.gwlb_mirror(frame, vni=rng.randrange(1 << 24)), "geneve"


def ip_options(rng):
    """IPv4 with 4-40 bytes of options (some nonsense), or IPv6 with a chain of extension
    headers (hop-by-hop, routing, fragment, destination, AH, unknown), long or broken."""
    l4 = build.tcp(rng.randbytes(rng.randrange(0, 32)), sport=rng.randrange(65536))
    if rng.random() < 0.5:
        options = rng.randbytes(4 * rng.randrange(1, 11))
        packet = build.ipv4(l4, options=options, more_fragments=rng.random() < 0.2,
                            frag_offset=8 * rng.randrange(0, 16))
        frame = build.ethernet(packet)
    else:
        chain = []
        for _ in range(rng.randrange(1, 12)):
            kind = rng.choice((0, 43, 60, 51, 135, 139, 140, 44))
            if kind == 44:
                chain.append(build.ipv6_fragment(8 * rng.randrange(0, 64), rng.random() < 0.5,
                                                 rng.randrange(1 << 32)))
            else:
                chain.append((kind, rng.randbytes(rng.randrange(0, 40))))
        packet = bytearray(build.ipv6(l4, extensions=chain))
        if rng.random() < 0.2:  # a header length that runs past the packet
            packet[41] = 255
        frame = build.ethernet(bytes(packet), ethertype=build.ETH_IPV6)
    return encapsulate(rng, frame)


def zero_length(rng):
    return b"", rng.choice(("vxlan", "geneve"))


def jumbo(rng):
    """A 9000-byte frame (VPC jumbo MTU), whole or cut anywhere."""
    overhead = len(valid_frame(random.Random(0), 0))  # headers of the default shape
    frame = valid_frame(rng, payload_len=max(0, JUMBO - overhead - 40))
    data, listener = encapsulate(rng, frame)
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data))]
    return data, listener


KINDS = {
    "valid": valid,
    "random": random_bytes,
    "bit_flips": bit_flips,
    "byte_splat": byte_splat,
    "wrong_flags": wrong_flags,
    "cut_headers": cut_headers,
    "absurd_lengths": absurd_lengths,
    "nested_tunnels": nested_tunnels,
    "ip_options": ip_options,
    "zero_length": zero_length,
    "jumbo": jumbo,
}


def stream(seed: int, count: int, kinds=tuple(KINDS)):
    """`count` (kind, payload, listener) triples, round-robin over `kinds`, reproducible."""
    rng = random.Random(seed)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        payload, listener = KINDS[kind](rng)
        yield kind, payload, listener
