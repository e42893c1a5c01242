"""From a UDP payload received on a mirror port to a `Packet`.

Exactly one mirror encapsulation is removed: VXLAN on 4789, VXLAN-GPE on 4790, GENEVE on
6081, and GENEVE -> IPv4/IPv6 -> UDP 4789 -> VXLAN as a Gateway Load Balancer delivers
mirrored traffic. A customer's own tunnel inside the mirrored frame is payload.
"""

from __future__ import annotations

from collector.decode import ethernet, geneve, ipv4, ipv6, l4, vxlan
from collector.decode.errors import Malformed
from collector.decode.packet import ETH_IPV4, ETH_IPV6, Packet

VXLAN_PORT = 4789
VXLAN_GPE_PORT = 4790
GENEVE_PORT = 6081

_DECAPSULATORS = {
    VXLAN_PORT: vxlan.parse,
    VXLAN_GPE_PORT: vxlan.parse_gpe,
    GENEVE_PORT: geneve.parse,
}
_L3 = {ETH_IPV4: ipv4.parse, ETH_IPV6: ipv6.parse}
_ETHERTYPE_OF_LINK = {"ipv4": ETH_IPV4, "ipv6": ETH_IPV6}
# the length field must have been received for the wire length to be known
_LENGTH_FIELD_END = {4: 4, 6: 6}  # bytes of IP header up to the end of its length field

__all__ = ["decode_datagram", "decode_frame", "Malformed", "Packet"]


def decode_datagram(payload, port: int = VXLAN_PORT, *, length: int | None = None) -> Packet:
    """Decode one UDP payload received on `port` (4789, 4790 or 6081).

    `payload` is any bytes-like object. `length` is the datagram's real length when
    `payload` holds only its first bytes (a fixed-size receive slot): lengths are computed
    from it, fields from the bytes at hand. Raises `Malformed` and nothing else for any input.
    """
    try:
        decapsulate = _DECAPSULATORS[port]
    except KeyError:
        raise ValueError(f"no mirror encapsulation on UDP port {port}") from None
    end = len(payload)
    if length is None:
        length = end
    elif length < end:
        raise ValueError(f"length {length} is shorter than the {end} bytes given")
    pkt = Packet()
    inner = decapsulate(payload, 0, end, pkt)
    if port == GENEVE_PORT:
        vxlan_at = geneve.vxlan_offset(payload, inner, end, pkt.link)
        if vxlan_at is not None:
            # GWLB delivering mirrored traffic: the session VNI is the VXLAN one.
            inner = vxlan.parse(payload, vxlan_at, end, pkt)
            pkt.encap, pkt.ethertype = "geneve-vxlan", None
    decode_frame(payload, inner, end, pkt, length - inner)
    return pkt


def decode_frame(buf, base: int, end: int, pkt: Packet, captured_len: int | None = None) -> Packet:
    """Decode the mirrored frame at buf[base:end] into `pkt` (its `link` says how it starts).

    `captured_len` is the frame's received length when the buffer holds only a prefix.
    """
    pkt.captured_len = end - base if captured_len is None else captured_len
    frame_end = base + pkt.captured_len  # may lie past `end` for a prefix buffer
    if pkt.link == "ethernet":
        l3 = ethernet.parse(buf, base, end, pkt)
        if l3 is None:
            # The copy ended inside the Ethernet header or its tags; a prefix buffer that ends
            # there says nothing about the copy.
            pkt.truncated = end == frame_end
            return pkt
    elif pkt.link in _ETHERTYPE_OF_LINK:
        l3, pkt.ethertype = base, _ETHERTYPE_OF_LINK[pkt.link]
    else:
        return pkt
    parse_l3 = _L3.get(pkt.ethertype)
    if parse_l3 is None:
        return pkt  # ARP, LLDP, MPLS...: reported by ethertype only
    pkt.l3_offset = l3 - base
    l4_at = parse_l3(buf, l3, end, pkt)
    ip_bytes = frame_end - l3
    if pkt.wire_len is not None:
        pkt.truncated = ip_bytes < pkt.wire_len
        end = min(end, l3 + pkt.wire_len)  # Ethernet padding after the IP packet is not L4
    else:
        # Cut before the length field (or, version unknown, before the first byte); a TSO
        # frame or jumbogram with its length field received is not known to be cut.
        pkt.truncated = ip_bytes < _LENGTH_FIELD_END.get(pkt.ip_version, 1)
    if l4_at is not None and pkt.ip_proto is not None:
        pkt.l4_offset = l4_at - base
        l4.parse(buf, l4_at, end, pkt.ip_proto, pkt)
    return pkt
