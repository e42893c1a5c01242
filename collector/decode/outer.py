"""From a captured frame to the UDP datagram a mirroring target received.

`outer_datagram(linktype, data)` peels the link layer, the outer IPv4/IPv6 header and the UDP
header off one capture record and returns the mirror datagram (destination port 4789, 4790 or
6081) that `decode_datagram` takes, or None for anything else. It is what the kernel does for
the live listener, done for a capture: no reassembly, no checksum check (AWS sends UDP
checksum 0), and never an exception, whatever the bytes.

Link types (LINKTYPE_* values): 1 Ethernet with any number of 802.1Q/802.1ad/0x9100 tags,
113 Linux cooked (SLL) and 276 (SLL2), 0 BSD loopback (address family in the capturing host's
byte order) and 108 OpenBSD loopback (network order), 12/14/101 raw IP, 228 IPv4, 229 IPv6.
"""

from __future__ import annotations

from typing import NamedTuple

from collector.decode.datagram import GENEVE_PORT, VXLAN_GPE_PORT, VXLAN_PORT
from collector.decode.ethernet import VLAN_TPIDS
from collector.decode.packet import ETH_IPV4, ETH_IPV6

MIRROR_PORTS = frozenset((VXLAN_PORT, VXLAN_GPE_PORT, GENEVE_PORT))
UDP = 17
UDP_HEADER_LEN = 8

__all__ = ["MIRROR_PORTS", "Outer", "link_layer", "outer_datagram"]


class Outer(NamedTuple):
    """The mirror datagram carried by one captured frame."""

    port: int  # UDP destination port: the mirror encapsulation
    payload: bytes  # the UDP payload bytes the capture holds
    payload_len: int  # the payload length the datagram had: UDP length - 8 (see outer_datagram)
    src: bytes  # outer source address, 4 or 16 bytes: the mirrored ENI (or the GWLB, NLB)
    dst: bytes  # outer destination address
    src_port: int  # UDP source port: AWS's hash of the inner flow

    @property
    def cut(self) -> bool:
        """The capture holds only the first bytes of the datagram (a snaplen)."""
        return len(self.payload) < self.payload_len


def outer_datagram(linktype: int, data) -> Outer | None:
    """The mirror datagram in `data`, a frame captured with link type `linktype`, or None.

    None for a frame that does not carry IPv4/IPv6 UDP to a mirror port, that the capture cut
    before the end of the UDP header, or that is a non-first IP fragment (its UDP header is in
    the first). A first fragment yields the bytes it carries, `payload_len` the whole
    datagram's. `payload_len` is the UDP length minus 8; when the UDP length is 0 (an IPv6
    jumbogram) it comes from the IP length, or is the captured amount when that is 0 too.
    """
    link = _LINKS.get(linktype)
    if link is None:
        return None
    located = link(data)
    if located is None:
        return None
    ethertype, at = located
    if ethertype == ETH_IPV4:
        return _ipv4(data, at)
    if ethertype == ETH_IPV6:
        return _ipv6(data, at)
    return None


def link_layer(linktype: int, data) -> tuple[int, int] | None:
    """(ethertype, offset of the network header) of a frame of link type `linktype`, or None
    for an unknown link type or a frame cut inside its link header. Raw-IP link types report
    the ethertype of the IP version they carry."""
    link = _LINKS.get(linktype)
    return None if link is None else link(data)


# -- link layers: each returns (ethertype, offset of the IP header) or None ---------------------


def _u16(data, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def _after_tags(data, ethertype: int, at: int) -> tuple[int, int] | None:
    """Walk the VLAN tags that follow an ethertype field ending at `at`."""
    while ethertype in VLAN_TPIDS:
        if at + 4 > len(data):
            return None
        ethertype, at = _u16(data, at + 2), at + 4  # skip the TCI, read the next type
    return ethertype, at


def _ethernet(data) -> tuple[int, int] | None:
    if len(data) < 14:
        return None
    return _after_tags(data, _u16(data, 12), 14)


def _linux_sll(data) -> tuple[int, int] | None:
    # packet type, ARPHRD type, address length, address (8), protocol (an ethertype)
    if len(data) < 16:
        return None
    return _after_tags(data, _u16(data, 14), 16)


def _linux_sll2(data) -> tuple[int, int] | None:
    # protocol (an ethertype), reserved, interface index, ARPHRD type, packet type, address
    if len(data) < 20:
        return None
    return _after_tags(data, _u16(data, 0), 20)


# BSD AF_INET is 2 everywhere; AF_INET6 is 24 (NetBSD, OpenBSD), 28 (FreeBSD), 30 (Darwin)
_LOOPBACK_FAMILIES = {2: ETH_IPV4, 24: ETH_IPV6, 28: ETH_IPV6, 30: ETH_IPV6}


def _bsd_loopback(data) -> tuple[int, int] | None:
    """DLT_NULL: a 4-byte address family in the byte order of the host that captured. The
    families are small numbers, so only one byte order can name one."""
    if len(data) < 4:
        return None
    family = int.from_bytes(data[:4], "little")
    if family not in _LOOPBACK_FAMILIES:
        family = int.from_bytes(data[:4], "big")
    ethertype = _LOOPBACK_FAMILIES.get(family)
    return None if ethertype is None else (ethertype, 4)


def _openbsd_loopback(data) -> tuple[int, int] | None:
    if len(data) < 4:
        return None
    ethertype = _LOOPBACK_FAMILIES.get(int.from_bytes(data[:4], "big"))
    return None if ethertype is None else (ethertype, 4)


def _raw_ip(data) -> tuple[int, int] | None:
    version = data[0] >> 4 if len(data) else 0
    return (ETH_IPV4, 0) if version == 4 else (ETH_IPV6, 0) if version == 6 else None


def _ipv4_only(data) -> tuple[int, int]:
    return ETH_IPV4, 0  # the version nibble is checked with the header


def _ipv6_only(data) -> tuple[int, int]:
    return ETH_IPV6, 0


_LINKS = {
    0: _bsd_loopback,
    1: _ethernet,
    12: _raw_ip,  # LINKTYPE_RAW as OpenBSD numbers it
    14: _raw_ip,  # ... and BSD/OS
    101: _raw_ip,
    108: _openbsd_loopback,
    113: _linux_sll,
    228: _ipv4_only,
    229: _ipv6_only,
    276: _linux_sll2,
}


# -- outer IP ----------------------------------------------------------------------------------


def _ipv4(data, l3: int) -> Outer | None:
    if len(data) - l3 < 20 or data[l3] >> 4 != 4 or data[l3 + 9] != UDP:
        return None
    header_len = (data[l3] & 0x0F) * 4
    total_len = _u16(data, l3 + 2)
    if header_len < 20 or _u16(data, l3 + 6) & 0x1FFF:
        return None  # impossible IHL, or a non-first fragment: no UDP header here
    if total_len == 0:
        ip_end = None  # TSO: the length was left for the NIC to fill in
    elif total_len < header_len + UDP_HEADER_LEN:
        return None  # the IP packet is too short to hold a UDP header
    else:
        ip_end = l3 + total_len
    return _udp(data, l3 + header_len, ip_end, bytes(data[l3 + 12 : l3 + 16]),
                bytes(data[l3 + 16 : l3 + 20]))


# IPv6 extension headers in the generic format (next header, length in 8-octet units - 1) that
# may precede an outer UDP header: hop-by-hop, routing, destination options
_GENERIC_EXTENSIONS = frozenset((0, 43, 60))
_FRAGMENT = 44


def _ipv6(data, l3: int) -> Outer | None:
    if len(data) - l3 < 40 or data[l3] >> 4 != 6:
        return None
    payload_len = _u16(data, l3 + 4)
    ip_end = l3 + 40 + payload_len if payload_len else None  # 0: a jumbogram
    next_header, at = data[l3 + 6], l3 + 40
    while next_header != UDP:
        if at + 8 > len(data):
            return None  # every extension header is at least 8 bytes
        if next_header == _FRAGMENT:
            if _u16(data, at + 2) & 0xFFF8:
                return None  # a non-first fragment
            next_header, at = data[at], at + 8
        elif next_header in _GENERIC_EXTENSIONS:
            next_header, at = data[at], at + (data[at + 1] + 1) * 8
        else:
            return None
    return _udp(data, at, ip_end, bytes(data[l3 + 8 : l3 + 24]), bytes(data[l3 + 24 : l3 + 40]))


# -- UDP ---------------------------------------------------------------------------------------


def _udp(data, at: int, ip_end: int | None, src: bytes, dst: bytes) -> Outer | None:
    """The datagram at `at`; `ip_end` is where the IP length says the packet ends (it may lie
    past the captured bytes), None when the IP header does not say."""
    captured_end = len(data)
    if at + UDP_HEADER_LEN > captured_end or (ip_end is not None and at + 8 > ip_end):
        return None
    port = _u16(data, at + 2)
    if port not in MIRROR_PORTS:
        return None
    udp_len = _u16(data, at + 4)
    start = at + UDP_HEADER_LEN
    if udp_len >= UDP_HEADER_LEN:
        payload_len = udp_len - UDP_HEADER_LEN
    elif udp_len == 0:  # RFC 2675 jumbogram: the IP layer has the length, if anything does
        payload_len = (captured_end if ip_end is None else ip_end) - start
    else:
        return None  # UDP length 1..7 cannot be
    # The payload present: bounded by the capture, by the IP packet (Ethernet pads short
    # frames) and by the UDP length.
    end = min(captured_end, start + payload_len)
    if ip_end is not None:
        end = min(end, ip_end)
    return Outer(port, bytes(data[start:end]), payload_len, src, dst, _u16(data, at))
