"""IPv6 (RFC 8200) and its extension-header chain.

The upper-layer protocol is the last Next Header of the chain: hop-by-hop options, routing,
fragment, destination options, AH (RFC 4302: length in 4-octet units) and the other headers
that share the generic format (mobility, HIP, shim6) are walked. A copy cut inside the chain
keeps the fixed header's fields; the protocol stays unknown unless the byte naming it survived.
"""

from __future__ import annotations

from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

HEADER_LEN = 40
FRAGMENT = 44
AH = 51
# extension headers in the generic (next header, length in 8-octet units - 1) format
_GENERIC_EXTENSIONS = frozenset((0, 43, 60, 135, 139, 140))


def parse(buf, off: int, end: int, pkt: Packet) -> int | None:
    """Fill the IPv6 fields present in buf[off:end]; return the L4 header offset when the
    packet carries one at a known place, else None."""
    avail = end - off
    if avail < 1:
        return None
    if buf[off] >> 4 != 6:
        raise Malformed(Reason.IP_VERSION, off, f"version {buf[off] >> 4} under ethertype IPv6")
    pkt.ip_version = 6
    if avail >= 2:
        pkt.ip_tos = ((buf[off] & 0x0F) << 4) | (buf[off + 1] >> 4)
    if avail >= 6:
        payload_len = (buf[off + 4] << 8) | buf[off + 5]
        # 0 announces a jumbogram (RFC 2675): the real length sits in a hop-by-hop option.
        pkt.wire_len = HEADER_LEN + payload_len if payload_len else None
    if avail >= 8:
        pkt.ip_ttl = buf[off + 7]
    if avail >= 24:
        pkt.src_addr = bytes(buf[off + 8 : off + 24])
    if avail >= HEADER_LEN:
        pkt.dst_addr = bytes(buf[off + 24 : off + 40])
    if avail < 7:
        return None
    return _walk_chain(buf, off, end, buf[off + 6], off + HEADER_LEN, pkt)


def _walk_chain(buf, l3: int, end: int, next_header: int, at: int, pkt: Packet) -> int | None:
    fragment_seen = False
    while True:
        if next_header == FRAGMENT:
            if at + 8 > end:
                return None  # offset unknown: not even whether the upper header is here
            fragment_seen = True
            field = (buf[at + 2] << 8) | buf[at + 3]
            pkt.frag_offset = field & 0xFFF8
            pkt.more_fragments = bool(field & 1)
            pkt.ip_id = int.from_bytes(buf[at + 4 : at + 8], "big")
            next_header, length = buf[at], 8
        elif next_header in _GENERIC_EXTENSIONS or next_header == AH:
            if at + 1 > end:
                return None
            following = buf[at]
            if at + 2 > end:
                # The protocol is known when this is the last header, its end is not.
                if following not in _GENERIC_EXTENSIONS and following not in (AH, FRAGMENT):
                    _upper(pkt, following, fragment_seen)
                return None
            unit, extra = (4, 2) if next_header == AH else (8, 1)
            next_header, length = following, (buf[at + 1] + extra) * unit
        else:
            _upper(pkt, next_header, fragment_seen)
            pkt.ip_header_len = at - l3
            if pkt.frag_offset or at > end:
                return None  # a non-first fragment (its upper header is in fragment 0), or cut
            return at
        at += length


def _upper(pkt: Packet, protocol: int, fragment_seen: bool) -> None:
    pkt.ip_proto = protocol
    if not fragment_seen:
        pkt.frag_offset, pkt.more_fragments = 0, False
