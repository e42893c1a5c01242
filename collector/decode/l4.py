"""Upper-layer headers: the port pair, TCP flags, ICMP type and code.

TCP, UDP, UDP-Lite, SCTP and DCCP all start with source and destination port, so one reader
serves them. Checksums are never looked at: AWS does not compute them on truncated copies.
"""

from __future__ import annotations

from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

TCP, UDP, DCCP, ICMP, ICMPV6, SCTP, UDPLITE = 6, 17, 33, 1, 58, 132, 136
PORT_PROTOCOLS = frozenset((TCP, UDP, DCCP, SCTP, UDPLITE))
ICMP_PROTOCOLS = frozenset((ICMP, ICMPV6))


def parse(buf, off: int, end: int, protocol: int, pkt: Packet) -> None:
    """Fill the L4 fields whose bytes are in buf[off:end]."""
    avail = end - off
    if protocol in PORT_PROTOCOLS:
        if avail >= 2:
            pkt.src_port = (buf[off] << 8) | buf[off + 1]
        if avail >= 4:
            pkt.dst_port = (buf[off + 2] << 8) | buf[off + 3]
        if protocol == TCP:
            _tcp(buf, off, avail, pkt)
        elif protocol == UDP and avail >= 6:
            udp_len = (buf[off + 4] << 8) | buf[off + 5]
            if 0 < udp_len < 8:  # 0 is legal: IPv6 jumbograms (RFC 2675)
                raise Malformed(Reason.UDP_LENGTH, off + 4, f"UDP length {udp_len} < 8")
    elif protocol in ICMP_PROTOCOLS:
        if avail >= 1:
            pkt.icmp_type = buf[off]
        if avail >= 2:
            pkt.icmp_code = buf[off + 1]


def _tcp(buf, off: int, avail: int, pkt: Packet) -> None:
    if avail < 13:
        return
    data_offset = buf[off + 12] >> 4
    if data_offset < 5:
        raise Malformed(Reason.TCP_HEADER_LENGTH, off + 12, f"data offset {data_offset} < 5")
    if avail >= 14:
        # NS (the low bit of byte 12) above the eight classic flags; the low 6 bits are the
        # VPC Flow Logs tcp-flags values (FIN 1, SYN 2, RST 4, PSH 8, ACK 16, URG 32).
        pkt.tcp_flags = ((buf[off + 12] & 1) << 8) | buf[off + 13]
