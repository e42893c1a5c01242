"""GENEVE (RFC 8926) on UDP 6081, as a Gateway Load Balancer delivers it.

    |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
    |        Virtual Network Identifier (VNI)       |    Reserved   |
    |                    Variable-Length Options                    |

GWLB uses option class 0x0108 with TLV types 1 (endpoint id, 8 bytes), 2 (attachment id,
8 bytes) and 3 (flow cookie, 4 bytes), and protocol type IPv4/IPv6 (no inner Ethernet).
Behind a GWLB, mirrored traffic is that IPv4/IPv6 packet carrying UDP 4789 VXLAN: the
caller (`datagram`) removes that VXLAN layer too, via `vxlan_offset`.
"""

from __future__ import annotations

from collector.decode.errors import Malformed, Reason
from collector.decode.packet import ETH_IPV4, ETH_IPV6, Packet

HEADER_LEN = 8
AWS_OPTION_CLASS = 0x0108
ETH_TRANSPARENT_BRIDGING = 0x6558  # the inner frame is Ethernet
VXLAN_PORT = 4789

_LINK_BY_PROTOCOL = {ETH_TRANSPARENT_BRIDGING: "ethernet", ETH_IPV4: "ipv4", ETH_IPV6: "ipv6"}
# AWS option type -> Packet attribute, expected data length
_AWS_OPTIONS = {
    1: ("gwlb_endpoint_id", 8),
    2: ("gwlb_attachment_id", 8),
    3: ("gwlb_flow_cookie", 4),
}


def parse(buf, off: int, end: int, pkt: Packet) -> int:
    """Fill the GENEVE fields of `pkt`; return the offset of the inner packet."""
    if end - off < HEADER_LEN:
        raise Malformed(Reason.GENEVE_TRUNCATED, off, f"{end - off} bytes, GENEVE needs 8")
    version = buf[off] >> 6
    if version:
        raise Malformed(Reason.GENEVE_VERSION, off, f"version {version}, only 0 exists")
    options_end = off + HEADER_LEN + (buf[off] & 0x3F) * 4
    if options_end > end:
        raise Malformed(
            Reason.GENEVE_TRUNCATED, off, f"options end at {options_end}, datagram at {end}"
        )
    protocol = int.from_bytes(buf[off + 2 : off + 4], "big")
    pkt.encap = "geneve"
    pkt.geneve_vni = pkt.vni = int.from_bytes(buf[off + 4 : off + 7], "big")
    pkt.reserved_bits = bool(buf[off + 1] & 0x3F or buf[off + 7])
    pkt.link = _LINK_BY_PROTOCOL.get(protocol, "other")
    if pkt.link != "ethernet":
        pkt.ethertype = protocol  # no Ethernet header: the protocol type is the ethertype
    _parse_options(buf, off + HEADER_LEN, options_end, pkt)
    return options_end


def _parse_options(buf, off: int, end: int, pkt: Packet) -> None:
    while off < end:
        if end - off < 4:
            raise Malformed(Reason.GENEVE_OPTION_LENGTH, off, "option header cut by Opt Len")
        option_class = int.from_bytes(buf[off : off + 2], "big")
        option_type = buf[off + 2]
        data_len = (buf[off + 3] & 0x1F) * 4
        data_start = off + 4
        off = data_start + data_len
        if off > end:
            raise Malformed(
                Reason.GENEVE_OPTION_LENGTH, data_start - 4,
                f"option 0x{option_class:04x}/{option_type} of {data_len} bytes overruns options",
            )
        if option_class == AWS_OPTION_CLASS:
            # The critical bit (0x80) of the type does not change the meaning for us.
            known = _AWS_OPTIONS.get(option_type & 0x7F)
            if known and data_len >= known[1]:
                value = int.from_bytes(buf[data_start : data_start + known[1]], "big")
                setattr(pkt, known[0], value)


def vxlan_offset(buf, off: int, end: int, link: str) -> int | None:
    """Offset of a VXLAN header carried as IPv4/IPv6 UDP to 4789 at `off`, else None.

    This is how GWLB delivers mirrored traffic. Anything else inside GENEVE (including a
    packet cut before its UDP destination port) is the inspected packet itself.
    """
    if link == "ipv4":
        if end - off < 20 or buf[off] >> 4 != 4 or buf[off + 9] != 17:
            return None
        if int.from_bytes(buf[off + 6 : off + 8], "big") & 0x1FFF:
            return None  # a non-first fragment carries no UDP header
        udp = off + (buf[off] & 0x0F) * 4
    elif link == "ipv6":
        if end - off < 40 or buf[off] >> 4 != 6 or buf[off + 6] != 17:
            return None
        udp = off + 40
    else:
        return None
    if udp < off + 20 or end - udp < 8:
        return None
    if int.from_bytes(buf[udp + 2 : udp + 4], "big") != VXLAN_PORT:
        return None
    return udp + 8
