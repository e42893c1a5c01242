"""Packet builder: mirrored traffic as AWS sends it, for tests, notebooks and replay.

Layers are plain functions that take the payload and return bytes, so they nest the way the
wire does::

    frame = ethernet(ipv4(tcp(sport=40000, dport=443, flags=SYN), src="10.0.0.1",
                          dst="10.0.0.2", proto=TCP), ethertype=ETH_IPV4)
    datagram = vxlan(truncate(frame, 25), vni=7159709)

`mirrored_frame()` builds a whole inner frame from a `FrameSpec` and also says where each
decoded field ends, which the decoder's truncation tests rely on. Checksums are computed, so
the output is valid for tshark and for the receiving kernel.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
VXLAN_PORT, GENEVE_PORT = 4789, 6081
AWS_GENEVE_CLASS = 0x0108
MAX_PACKET_LENGTH = 8500  # AWS PacketLength range is 1..8500

DEFAULT_SRC_MAC = bytes.fromhex("0a0000000001")
DEFAULT_DST_MAC = bytes.fromhex("0a0000000002")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(value, size: int | None = None) -> bytes:
    packed = value if isinstance(value, bytes) else ipaddress.ip_address(value).packed
    if size is not None and len(packed) != size:
        raise ValueError(f"address {value!r} is not IPv{4 if size == 4 else 6}")
    return packed


# -- link layer ----------------------------------------------------------------------------


def ethernet(payload: bytes, *, ethertype: int = ETH_IPV4, src: bytes = DEFAULT_SRC_MAC,
             dst: bytes = DEFAULT_DST_MAC, vlans=(), tpid: int = TPID_8021Q) -> bytes:
    """An Ethernet II frame, no FCS. `vlans`: VLAN ids (or (tpid, pcp, vid)), outermost first."""
    tags = b""
    for vlan in vlans:
        tag_tpid, pcp, vid = vlan if isinstance(vlan, tuple) else (tpid, 0, vlan)
        tags += struct.pack("!HH", tag_tpid, (pcp << 13) | (vid & 0x0FFF))
    return dst + src + tags + struct.pack("!H", ethertype) + payload


# -- network layer ---------------------------------------------------------------------------


def ipv4(payload: bytes, *, src="10.0.0.1", dst="10.0.0.2", proto: int = TCP, ttl: int = 64,
         ident: int = 0, tos: int = 0, dont_fragment: bool = False, more_fragments: bool = False,
         frag_offset: int = 0, options: bytes = b"", total_length: int | None = None) -> bytes:
    """An IPv4 packet with a correct header checksum. `frag_offset` in bytes (multiple of 8).

    `total_length` overrides the length field (to build the wire length of a packet whose
    payload is not all given, e.g. a GSO frame or a deliberately inconsistent one).
    """
    if len(options) % 4:
        raise ValueError("IPv4 options must be padded to a multiple of 4 bytes")
    header_len = 20 + len(options)
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    length = header_len + len(payload) if total_length is None else total_length
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | header_len // 4, tos, length, ident,
                         flags | (frag_offset // 8), ttl, proto, 0, _addr(src, 4), _addr(dst, 4))
    header += options
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def ipv6(payload: bytes, *, src="fd00::1", dst="fd00::2", next_header: int = TCP,
         hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0,
         extensions=()) -> bytes:
    """An IPv6 packet. `extensions`: (header type, body bytes) pairs, outermost first; the
    body excludes the next-header and length bytes and is padded to the header's unit."""
    chain, types = b"", [ext[0] for ext in extensions] + [next_header]
    for (ext_type, body), following in zip(extensions, types[1:]):
        chain += _extension(ext_type, body, following)
    first = types[0]
    word = (6 << 28) | (traffic_class << 20) | flow_label
    return struct.pack("!IHBB16s16s", word, len(chain) + len(payload), first, hop_limit,
                       _addr(src, 16), _addr(dst, 16)) + chain + payload


def _extension(ext_type: int, body: bytes, following: int) -> bytes:
    if ext_type == 44:  # fragment: fixed 8 bytes, body = offset/M word + identification
        return struct.pack("!BB", following, 0) + body[:6].ljust(6, b"\0")
    unit, extra = (4, 2) if ext_type == 51 else (8, 1)
    body = body.ljust(-(-(len(body) + 2) // unit) * unit - 2, b"\0")
    body = body.ljust(max(len(body), unit * 2 - 2 if ext_type == 51 else 6), b"\0")
    return struct.pack("!BB", following, (len(body) + 2) // unit - extra) + body


def ipv6_fragment(offset: int, more: bool, ident: int) -> tuple[int, bytes]:
    """An IPv6 fragment extension header for `ipv6(extensions=...)`."""
    return 44, struct.pack("!HI", (offset & 0xFFF8) | int(more), ident)


# -- transport layer ---------------------------------------------------------------------------


def _pseudo_header(src, dst, proto: int, length: int) -> bytes:
    src, dst = _addr(src), _addr(dst)
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def tcp(payload: bytes = b"", *, sport: int = 40000, dport: int = 443, flags: int = SYN,
        seq: int = 0, ack: int = 0, window: int = 65535, options: bytes = b"",
        ip_src=None, ip_dst=None) -> bytes:
    """A TCP segment; the checksum is filled when the IP addresses are given."""
    offset_words = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (offset_words << 4) | (flags >> 8),
                         flags & 0xFF, window, 0, 0) + options
    segment = header + payload
    if ip_src is not None:
        checksum = _checksum(_pseudo_header(ip_src, ip_dst, TCP, len(segment)) + segment)
        segment = segment[:16] + struct.pack("!H", checksum) + segment[18:]
    return segment


def udp(payload: bytes = b"", *, sport: int = 40000, dport: int = 53, ip_src=None,
        ip_dst=None, length: int | None = None) -> bytes:
    """A UDP datagram; the checksum is filled when the IP addresses are given."""
    size = 8 + len(payload) if length is None else length
    datagram = struct.pack("!HHHH", sport, dport, size, 0) + payload
    if ip_src is not None:
        checksum = _checksum(_pseudo_header(ip_src, ip_dst, UDP, len(datagram)) + datagram) or 0xFFFF
        datagram = datagram[:6] + struct.pack("!H", checksum) + datagram[8:]
    return datagram


def icmp(icmp_type: int = 8, code: int = 0, payload: bytes = b"\0\1\0\1", *, ip_src=None,
         ip_dst=None) -> bytes:
    """ICMP (or ICMPv6 when the given addresses are IPv6: its checksum has a pseudo-header)."""
    message = struct.pack("!BBH", icmp_type, code, 0) + payload
    if ip_src is not None and len(_addr(ip_src)) == 16:
        checksum = _checksum(_pseudo_header(ip_src, ip_dst, ICMPV6, len(message)) + message)
    else:
        checksum = _checksum(message)
    return message[:2] + struct.pack("!H", checksum) + message[4:]


# -- mirror encapsulation ------------------------------------------------------------------------


def truncate(frame: bytes, packet_length: int | None) -> bytes:
    """Cut a frame as a session's `PacketLength` does (None = whole packets)."""
    if packet_length is None:
        return frame
    if not 1 <= packet_length <= MAX_PACKET_LENGTH:
        raise ValueError(f"PacketLength {packet_length} outside 1..{MAX_PACKET_LENGTH}")
    return frame[:packet_length]


def vxlan(frame: bytes, *, vni: int, flags: int = 0x08, reserved: bytes = b"\0\0\0",
          reserved_low: int = 0) -> bytes:
    """A VXLAN header as AWS writes it (08 00 00 00 | VNI | 00) in front of `frame`."""
    if not 0 <= vni < 1 << 24:
        raise ValueError(f"VNI {vni} outside 0..16777215")
    return bytes([flags]) + reserved + vni.to_bytes(3, "big") + bytes([reserved_low]) + frame


def geneve_option(option_class: int, option_type: int, data: bytes) -> bytes:
    if len(data) % 4:
        raise ValueError("GENEVE option data must be a multiple of 4 bytes")
    return struct.pack("!HBB", option_class, option_type, len(data) // 4) + data


def aws_gwlb_options(endpoint_id: int = 0x0123456789ABCDEF, attachment_id: int = 0x0FEDCBA987654321,
                     flow_cookie: int = 0x1234ABCD) -> bytes:
    """The three TLVs of option class 0x0108 that a Gateway Load Balancer adds."""
    return (geneve_option(AWS_GENEVE_CLASS, 1, endpoint_id.to_bytes(8, "big"))
            + geneve_option(AWS_GENEVE_CLASS, 2, attachment_id.to_bytes(8, "big"))
            + geneve_option(AWS_GENEVE_CLASS, 3, flow_cookie.to_bytes(4, "big")))


def geneve(inner: bytes, *, vni: int = 0, protocol: int = ETH_IPV4, options: bytes = b"",
           version: int = 0) -> bytes:
    """A GENEVE header (RFC 8926) in front of `inner`."""
    if len(options) % 4 or len(options) > 252:
        raise ValueError("GENEVE options must be a multiple of 4 bytes, at most 252")
    first = (version << 6) | (len(options) // 4)
    return struct.pack("!BBH", first, 0, protocol) + vni.to_bytes(3, "big") + b"\0" + options + inner


def gwlb_mirror(frame: bytes, *, vni: int, outer_src="10.0.1.10", outer_dst="10.0.2.20",
                source_port: int = 65000, geneve_vni: int = 0, options: bytes | None = None) -> bytes:
    """Mirrored traffic as a GWLB endpoint delivers it: GENEVE -> IPv4 -> UDP 4789 -> VXLAN."""
    vxlan_udp = udp(vxlan(frame, vni=vni), sport=source_port, dport=VXLAN_PORT)
    inner_ip = ipv4(vxlan_udp, src=outer_src, dst=outer_dst, proto=UDP, ttl=255)
    return geneve(inner_ip, vni=geneve_vni, protocol=ETH_IPV4,
                  options=aws_gwlb_options() if options is None else options)


# -- whole frames with their field layout ------------------------------------------------------


@dataclass(frozen=True)
class FrameSpec:
    """One inner frame: Ethernet, VLAN tags, IPv4/IPv6, and TCP/UDP/ICMP."""

    ip_version: int = 4
    proto: int = TCP
    src: str = "10.0.0.1"
    dst: str = "10.0.0.2"
    sport: int = 40000
    dport: int = 443
    tcp_flags: int = SYN
    icmp_type: int = 8
    icmp_code: int = 0
    vlans: tuple[int, ...] = ()
    ttl: int = 64
    ident: int = 0
    payload: bytes = b""


@dataclass(frozen=True)
class Frame:
    """A built frame and, for each decoded field, (value, bytes of frame needed to see it)."""

    data: bytes
    fields: dict = field(default_factory=dict)


def mirrored_frame(spec: FrameSpec) -> Frame:
    """Build the inner frame of `spec` and the layout the decoder must recover from it."""
    v6 = spec.ip_version == 6
    src, dst = _addr(spec.src), _addr(spec.dst)
    if spec.proto == TCP:
        l4 = tcp(spec.payload, sport=spec.sport, dport=spec.dport, flags=spec.tcp_flags,
                 ip_src=src, ip_dst=dst)
    elif spec.proto == UDP:
        l4 = udp(spec.payload, sport=spec.sport, dport=spec.dport, ip_src=src, ip_dst=dst)
    else:
        l4 = icmp(spec.icmp_type, spec.icmp_code, spec.payload or b"\0\1\0\1", ip_src=src, ip_dst=dst)
    if v6:
        packet = ipv6(l4, src=src, dst=dst, next_header=spec.proto, hop_limit=spec.ttl)
    else:
        packet = ipv4(l4, src=src, dst=dst, proto=spec.proto, ttl=spec.ttl, ident=spec.ident)
    data = ethernet(packet, ethertype=ETH_IPV6 if v6 else ETH_IPV4, vlans=spec.vlans)
    return Frame(data, _layout(spec, len(packet), src, dst))


def _layout(spec: FrameSpec, wire_len: int, src: bytes, dst: bytes) -> dict:
    v6 = spec.ip_version == 6
    l3 = 14 + 4 * len(spec.vlans)
    l4 = l3 + (40 if v6 else 20)
    fields = {
        "eth_dst": (DEFAULT_DST_MAC, 6),
        "eth_src": (DEFAULT_SRC_MAC, 12),
        "ethertype": (ETH_IPV6 if v6 else ETH_IPV4, l3),
        "ip_version": (spec.ip_version, l3 + 1),
        "wire_len": (wire_len, l3 + (6 if v6 else 4)),
        "ip_ttl": (spec.ttl, l3 + (8 if v6 else 9)),
        "ip_proto": (spec.proto, l3 + (7 if v6 else 10)),
        "src_addr": (src, l3 + (24 if v6 else 16)),
        "dst_addr": (dst, l3 + (40 if v6 else 20)),
    }
    if not v6:
        fields["ip_id"] = (spec.ident, l3 + 6)
        fields["frag_offset"] = (0, l3 + 8)
    else:
        fields["frag_offset"] = (0, l3 + 7)  # known as soon as the chain is known to be empty
    if spec.proto in (TCP, UDP):
        fields["src_port"] = (spec.sport, l4 + 2)
        fields["dst_port"] = (spec.dport, l4 + 4)
    if spec.proto == TCP:
        fields["tcp_flags"] = (spec.tcp_flags, l4 + 14)
    if spec.proto in (ICMP, ICMPV6):
        fields["icmp_type"] = (spec.icmp_type, l4 + 1)
        fields["icmp_code"] = (spec.icmp_code, l4 + 2)
    return fields
