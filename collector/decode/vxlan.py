"""VXLAN (RFC 7348) on UDP 4789, and VXLAN-GPE (draft-ietf-nvo3-vxlan-gpe) on UDP 4790.

    0                   1                   2                   3
    |R|R|R|R|I|R|R|R|            Reserved (GBP: group policy id)     |
    |                VXLAN Network Identifier (VNI) |   Reserved    |

AWS sends `08 00 00 00 | VNI | 00`. On 4789 every bit but I is reserved: we tolerate set bits
(GBP, scapy's GPE-style 0x0c default) and report them, as the Linux kernel does; the P bit
only means "next protocol" on the GPE port, as Wireshark also decides by port.
"""

from __future__ import annotations

from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

HEADER_LEN = 8
FLAG_I = 0x08
FLAG_P = 0x04  # VXLAN-GPE: next protocol present
GPE_VERSION_MASK = 0x30

# VXLAN-GPE next protocol -> what the inner frame starts with
GPE_NEXT = {1: "ipv4", 2: "ipv6", 3: "ethernet"}


def parse(buf, off: int, end: int, pkt: Packet) -> int:
    """Fill the VXLAN fields of `pkt`; return the offset of the inner Ethernet frame."""
    if end - off < HEADER_LEN:
        raise Malformed(Reason.VXLAN_TRUNCATED, off, f"{end - off} bytes, VXLAN needs 8")
    flags = buf[off]
    if not flags & FLAG_I:
        raise Malformed(Reason.VXLAN_NO_VNI_FLAG, off, f"flags 0x{flags:02x} lack the I bit")
    pkt.vni = int.from_bytes(buf[off + 4 : off + 7], "big")
    # OR: behind a GWLB the GENEVE header's reserved bits were recorded first
    pkt.reserved_bits = pkt.reserved_bits or (
        flags != FLAG_I or buf[off + 1] or buf[off + 2] or buf[off + 3] or buf[off + 7]
    ) != 0
    pkt.link = "ethernet"
    return off + HEADER_LEN


def parse_gpe(buf, off: int, end: int, pkt: Packet) -> int:
    """VXLAN-GPE: like VXLAN, but byte 3 names the inner protocol when the P bit is set."""
    if end - off < HEADER_LEN:
        raise Malformed(Reason.VXLAN_TRUNCATED, off, f"{end - off} bytes, VXLAN-GPE needs 8")
    flags = buf[off]
    if flags & GPE_VERSION_MASK:
        raise Malformed(Reason.VXLAN_GPE_VERSION, off, f"flags 0x{flags:02x}: version != 0")
    if not flags & FLAG_I:
        raise Malformed(Reason.VXLAN_NO_VNI_FLAG, off, f"flags 0x{flags:02x} lack the I bit")
    pkt.encap = "vxlan-gpe"
    pkt.vni = int.from_bytes(buf[off + 4 : off + 7], "big")
    pkt.reserved_bits = (flags & ~(FLAG_I | FLAG_P | 0x03) or buf[off + 1] or buf[off + 7]) != 0
    if flags & FLAG_P:
        pkt.gpe_next_protocol = buf[off + 3]
        # Next protocol 0 is what scapy writes by default: it means nothing, the frame is Ethernet.
        pkt.link = GPE_NEXT.get(pkt.gpe_next_protocol, "ethernet" if pkt.gpe_next_protocol == 0 else "other")
    else:
        pkt.link = "ethernet"
    return off + HEADER_LEN
