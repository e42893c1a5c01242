"""IPv4 (RFC 791), read field by field so that a copy cut anywhere keeps what it holds.

With AWS's seed session (PacketLength 25 = 14 Ethernet + 11 IP bytes) version, total length,
identification, flags, TTL and protocol survive; the addresses do not.
"""

from __future__ import annotations

from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

MIN_HEADER_LEN = 20


def parse(buf, off: int, end: int, pkt: Packet) -> int | None:
    """Fill the IPv4 fields present in buf[off:end]; return the L4 header offset when the
    packet carries one (not a non-first fragment, header complete), else None."""
    avail = end - off
    if avail < 1:
        return None
    version_ihl = buf[off]
    if version_ihl >> 4 != 4:
        raise Malformed(Reason.IP_VERSION, off, f"version {version_ihl >> 4} under ethertype IPv4")
    pkt.ip_version = 4
    header_len = (version_ihl & 0x0F) * 4
    if header_len < MIN_HEADER_LEN:
        raise Malformed(Reason.IPV4_HEADER_LENGTH, off, f"IHL {header_len // 4} < 5")
    pkt.ip_header_len = header_len
    if avail >= 2:
        pkt.ip_tos = buf[off + 1]
    if avail >= 4:
        total_len = (buf[off + 2] << 8) | buf[off + 3]
        if total_len == 0:
            # TCP segmentation offload leaves 0 here (Wireshark: "assuming TSO"): length unknown.
            pass
        elif total_len < header_len:
            raise Malformed(
                Reason.IPV4_TOTAL_LENGTH, off + 2, f"total length {total_len} < header {header_len}"
            )
        else:
            pkt.wire_len = total_len
    if avail >= 6:
        pkt.ip_id = (buf[off + 4] << 8) | buf[off + 5]
    if avail >= 8:
        flags_frag = (buf[off + 6] << 8) | buf[off + 7]
        pkt.more_fragments = bool(flags_frag & 0x2000)
        pkt.frag_offset = (flags_frag & 0x1FFF) * 8
    if avail >= 9:
        pkt.ip_ttl = buf[off + 8]
    if avail >= 10:
        pkt.ip_proto = buf[off + 9]
    if avail >= 16:
        pkt.src_addr = bytes(buf[off + 12 : off + 16])
    if avail >= 20:
        pkt.dst_addr = bytes(buf[off + 16 : off + 20])
    if avail < header_len or pkt.frag_offset:
        return None  # options cut, or a non-first fragment: no L4 header here
    return off + header_len
