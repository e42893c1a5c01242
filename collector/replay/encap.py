"""From a captured record to the datagram AWS would have sent for it (sans-I/O).

`Encapsulator.mirror(record)` returns a `Mirrored`: the UDP payload to send, the outer UDP
source port to send it from, and the inner flow it belongs to. What AWS does, step by step
(`../shared/AWS-MIRRORING.md`, sections 1-3):

1. **The inner frame is Ethernet** (section 1: "a full Ethernet frame: 14-byte header, ...
   no FCS"). A record of another link type (Linux SLL / SLL2, BSD NULL / OpenBSD loopback,
   raw IP) gets a synthesised Ethernet header: zero MAC addresses and the ethertype the link
   header names (`collector.decode.outer.link_layer`), then the network layer as captured.
   This is what `collector ingest` does with such records, so a replay and an ingest of one
   capture see the same frames.
2. **Truncation** to the session's `PacketLength` (section 2): the first N bytes after the
   VXLAN header, Ethernet header included, 1-8500 (`build.truncate`). None = whole packets.
3. **Encapsulation**: VXLAN `08 00 00 00 | VNI | 00` (`build.vxlan`), sent to UDP 4789; or,
   with ``encap="geneve"``, as a Gateway Load Balancer delivers mirrored traffic (section 3):
   GENEVE with the AWS option class 0x0108 TLVs (endpoint id, attachment id, flow cookie)
   around IPv4 / UDP 4789 / that VXLAN packet (`build.gwlb_mirror`), sent to UDP 6081. The
   flow cookie is derived from the symmetric flow hash: one value per conversation, as a
   GWLB keeps one per flow.
4. **The outer UDP source port** is a stable hash of the inner packet's 5-tuple into
   49152-65535 (3-tuple for protocols other than TCP, UDP and ICMP). Section 1: AWS hashes
   the 5-tuple (packet-formats page); in a real capture both directions of one TCP flow
   shared a port but DNS queries and their replies did not. So the TCP hash is symmetric
   (the two endpoints are put in a fixed order first) and the UDP hash is direction-specific.
   For ICMP the "ports" are the type and code, direction-specific (AWS does not say which
   ICMP fields it hashes; an echo request and its reply then differ, like UDP). Protocols
   without ports, non-IP frames and packets whose ports are unknown (a non-first fragment,
   a capture cut before them) hash what they have. CRC-32, so the same capture gives the
   same ports on every run and machine.

With ``as_captured=True`` a record that already is a mirror datagram (a capture taken on a
mirroring target: `outer_datagram` finds UDP to 4789 / 4790 / 6081) is re-sent unchanged: its
UDP payload, VNI and GENEVE options as they are, from its original outer source port. Any
other record of such a capture is encapsulated as above when a VNI is given, else skipped.

Nothing here opens a socket or reads a clock.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from enum import Enum
from typing import NamedTuple

from collector import build
from collector.capture import Record
from collector.decode import GENEVE_PORT, VXLAN_PORT, Malformed, decode_datagram
from collector.decode.ethernet import VLAN_TPIDS
from collector.decode.outer import link_layer, outer_datagram

__all__ = [
    "ENCAPS",
    "PORT_RANGE",
    "Encapsulator",
    "Flow",
    "Mirrored",
    "Skip",
    "check_packet_length",
    "ethernet_frame",
    "flow_of",
    "source_port",
]

ENCAPS = ("vxlan", "geneve")
PORT_RANGE = (49152, 65535)  # the outer source ports AWS uses (observed: 65408-65525)
_PORT_BASE, _PORT_MASK = 49152, 0x3FFF  # 16384 ports: the low 14 bits of the hash
_CACHED_FLOWS = 1 << 16  # flows whose port is remembered (then the cache starts over)

ETH_IPV4, ETH_IPV6 = build.ETH_IPV4, build.ETH_IPV6
ICMP, TCP, UDP, ICMPV6 = build.ICMP, build.TCP, build.UDP, build.ICMPV6
_ETHERNET = 1  # LINKTYPE_ETHERNET
_ZERO_MACS = bytes(12)
_MIN_ETHERTYPE = 0x0600  # below: an 802.3 length or an SLL protocol that is no ethertype

# IPv6 extension headers walked to reach the upper layer: generic format (length in 8-octet
# units - 1), fragment (8 bytes), AH (length in 4-octet units - 2)
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_IPV6_EXTENSIONS = frozenset((0, 43, 60, 135, 139, 140, _IPV6_FRAGMENT, _IPV6_AH))


class Skip(str, Enum):
    """Why a record gives no datagram; `value` is what summaries print."""

    LINK_TYPE = "unknown link type or cut link header"
    NOT_ETHERNET = "link-layer protocol that is no ethertype"
    NO_VNI = "not a mirror datagram, and no VNI to encapsulate it"


def check_packet_length(packet_length: int | None) -> None:
    """Raise ValueError unless `packet_length` is None or a valid AWS PacketLength."""
    if packet_length is None:
        return
    if type(packet_length) is not int or not 1 <= packet_length <= build.MAX_PACKET_LENGTH:
        raise ValueError(
            f"packet length {packet_length!r} outside 1-{build.MAX_PACKET_LENGTH}: AWS "
            "PacketLength counts the bytes after the VXLAN header, Ethernet header included")


# -- the inner flow ----------------------------------------------------------------------------


class Flow(NamedTuple):
    """What the hash and the filter need of one inner frame.

    `src` and `dst` are packed IP addresses (4 or 16 bytes) for IP, MAC addresses for other
    frames, b"" when the capture cut them. Ports are TCP/UDP ports (None otherwise, or when
    not present: a non-first fragment, a cut copy); `icmp` is type << 8 | code.
    """

    ethertype: int
    proto: int | None = None
    src: bytes = b""
    dst: bytes = b""
    sport: int | None = None
    dport: int | None = None
    icmp: int | None = None

    @property
    def is_ip(self) -> bool:
        return self.ethertype in (ETH_IPV4, ETH_IPV6)

    def hash_key(self) -> bytes:
        """The bytes AWS's outer source port is a hash of (see the module docstring)."""
        proto = self.proto
        if not self.is_ip:
            return b"L" + self.ethertype.to_bytes(2, "big") + self.src + self.dst
        if proto == TCP:
            return self.symmetric_key()
        head = b"I" + bytes((255 if proto is None else proto,))
        if proto == UDP and self.sport is not None:
            return head + self.src + _port(self.sport) + self.dst + _port(self.dport)
        if proto in (ICMP, ICMPV6) and self.icmp is not None:
            return head + self.src + self.dst + _port(self.icmp)
        return head + self.src + self.dst

    def symmetric_key(self) -> bytes:
        """The same bytes for both directions of a conversation: flows are counted by it, and
        the TCP source port and GWLB flow cookie are hashes of it."""
        if not self.is_ip:
            low, high = sorted((self.src, self.dst))
            return b"L" + self.ethertype.to_bytes(2, "big") + low + high
        ports = self.proto in (TCP, UDP) and self.sport is not None
        a = self.src + (_port(self.sport) if ports else b"")
        b = self.dst + (_port(self.dport) if ports else b"")
        low, high = (a, b) if a <= b else (b, a)
        return b"S" + bytes((255 if self.proto is None else self.proto,)) + low + b"|" + high


def _port(value: int) -> bytes:
    return value.to_bytes(2, "big")


def source_port(flow: Flow) -> int:
    """The outer UDP source port for a packet of `flow`: 49152 + CRC-32 of its hash key,
    reduced to 14 bits (see the module docstring)."""
    return _PORT_BASE + (zlib.crc32(flow.hash_key()) & _PORT_MASK)


def flow_of(frame) -> Flow | None:
    """The flow of an Ethernet frame (bytes or a memoryview; VLAN tags walked), or None when
    it is cut inside its Ethernet header. Never raises: fields the frame does not hold stay
    empty."""
    end = len(frame)
    at = 12
    while True:
        if at + 2 > end:
            return None
        (ethertype,) = _U16(frame, at)
        if ethertype not in VLAN_TPIDS:
            break
        at += 4  # tag: TPID, TCI; the next ethertype follows
    l3 = at + 2
    if ethertype == ETH_IPV4:
        return _ipv4_flow(frame, l3, end)
    if ethertype == ETH_IPV6:
        return _ipv6_flow(frame, l3, end)
    return Flow(ethertype, None, bytes(frame[6:12]), bytes(frame[0:6]))


_U16 = struct.Struct("!H").unpack_from
_IPV4 = struct.Struct("!B5xHxB2x4s4s").unpack_from  # version/IHL, flags/offset, proto, addrs
_IPV6 = struct.Struct("!6xBx16s16s").unpack_from  # next header, addresses
_PORTS = struct.Struct("!HH").unpack_from


def _ipv4_flow(frame, l3: int, end: int) -> Flow:
    if end - l3 < 20:
        return Flow(ETH_IPV4, frame[l3 + 9] if end - l3 >= 10 else None)
    version_ihl, fragment, proto, src, dst = _IPV4(frame, l3)
    header_len = (version_ihl & 0x0F) * 4
    if header_len < 20 or fragment & 0x1FFF:  # impossible IHL, or a non-first fragment
        return Flow(ETH_IPV4, proto, src, dst)
    return _l4_flow(ETH_IPV4, proto, src, dst, frame, l3 + header_len, end)


def _ipv6_flow(frame, l3: int, end: int) -> Flow:
    if end - l3 < 40:
        return Flow(ETH_IPV6, frame[l3 + 6] if end - l3 >= 7 else None)
    proto, src, dst = _IPV6(frame, l3)
    at = l3 + 40
    while proto in _IPV6_EXTENSIONS:
        if at + 8 > end:
            return Flow(ETH_IPV6, None, src, dst)  # the upper layer is past the capture
        if proto == _IPV6_FRAGMENT:
            if _U16(frame, at + 2)[0] & 0xFFF8:
                return Flow(ETH_IPV6, frame[at], src, dst)  # a non-first fragment: no ports
            proto, at = frame[at], at + 8
        elif proto == _IPV6_AH:
            proto, at = frame[at], at + (frame[at + 1] + 2) * 4
        else:
            proto, at = frame[at], at + (frame[at + 1] + 1) * 8
    return _l4_flow(ETH_IPV6, proto, src, dst, frame, at, end)


def _l4_flow(ethertype: int, proto: int, src: bytes, dst: bytes, frame, at: int,
             end: int) -> Flow:
    if (proto == TCP or proto == UDP) and at + 4 <= end:
        return Flow(ethertype, proto, src, dst, *_PORTS(frame, at))
    if (proto == ICMP or proto == ICMPV6) and at + 2 <= end:
        return Flow(ethertype, proto, src, dst, icmp=_U16(frame, at)[0])
    return Flow(ethertype, proto, src, dst)


def _flow_of_packet(pkt) -> Flow | None:
    """The flow of a decoded `collector.decode.Packet` (the slow path, for GENEVE and
    VXLAN-GPE datagrams re-sent as captured)."""
    if pkt.ethertype is None:
        return None
    if pkt.ethertype not in (ETH_IPV4, ETH_IPV6):
        return Flow(pkt.ethertype, None, pkt.eth_src or b"", pkt.eth_dst or b"")
    ports = pkt.ip_proto in (TCP, UDP) and pkt.src_port is not None
    icmp = None if pkt.icmp_type is None else (pkt.icmp_type << 8) | (pkt.icmp_code or 0)
    return Flow(pkt.ethertype, pkt.ip_proto, pkt.src_addr or b"", pkt.dst_addr or b"",
                pkt.src_port if ports else None, pkt.dst_port if ports else None, icmp)


# -- frames and datagrams ----------------------------------------------------------------------


def ethernet_frame(record: Record) -> bytes | Skip:
    """The record as the Ethernet frame AWS would mirror (see step 1), or why it cannot be."""
    if record.linktype == _ETHERNET:
        return record.data if len(record.data) >= 14 else Skip.LINK_TYPE
    located = link_layer(record.linktype, record.data)
    if located is None:
        return Skip.LINK_TYPE
    ethertype, l3 = located
    if ethertype < _MIN_ETHERTYPE:
        return Skip.NOT_ETHERNET
    return _ZERO_MACS + ethertype.to_bytes(2, "big") + bytes(record.data[l3:])


class Mirrored(NamedTuple):
    """One datagram to send, and what the summary and the filter need to know of it."""

    payload: bytes  # the UDP payload: VXLAN (or GENEVE) header and the mirrored frame
    source_port: int  # the outer UDP source port to send it from
    port: int  # the UDP port the encapsulation belongs on: 4789 VXLAN, 6081 GENEVE, 4790
    vni: int | None  # the session VNI it carries (None: not known, e.g. a malformed datagram)
    flow: Flow | None  # the inner flow (None: cut inside the inner Ethernet header)
    truncated: bool  # cut to the packet length here
    cut_by_capture: bool  # the capture held fewer bytes than the packet (snaplen)
    conversation: bytes = b""  # the flow's `symmetric_key` (b"" without a flow)

    def flow_key(self) -> tuple:
        """Flows are counted by this: the VNI and the conversation, as `collector` keys
        flows (both directions one flow; the same packets under two VNIs are two flows)."""
        return (self.vni, self.conversation)


class Encapsulator:
    """Turns capture records into the datagrams AWS would send; holds the session's settings.

    `vni`: the session's VirtualNetworkId (required unless `as_captured`); `packet_length`:
    its PacketLength (None = whole packets); `encap`: "vxlan" or "geneve" (as a GWLB endpoint
    target receives it); `gwlb_src` / `gwlb_dst`: the IPv4 addresses of the VXLAN packet inside
    GENEVE (the source ENI and the GWLB endpoint); `endpoint_id` / `attachment_id`: the GENEVE
    option values.
    """

    def __init__(self, *, vni: int | None = None, packet_length: int | None = None,
                 encap: str = "vxlan", as_captured: bool = False, gwlb_src: str = "10.0.1.10",
                 gwlb_dst: str = "10.0.2.20", endpoint_id: int = 0x0123456789ABCDEF,
                 attachment_id: int = 0x0FEDCBA987654321) -> None:
        check_packet_length(packet_length)
        if encap not in ENCAPS:
            raise ValueError(f"encapsulation {encap!r}: expected one of {', '.join(ENCAPS)}")
        if vni is None and not as_captured:
            raise ValueError("a VNI is required to encapsulate (unless re-sending as captured)")
        self.vni, self.packet_length, self.encap = vni, packet_length, encap
        self.as_captured = as_captured
        # The 8 VXLAN bytes are the same for every packet: built once (08 00 00 00 | VNI | 00).
        self._vxlan = None if vni is None else build.vxlan(b"", vni=vni)
        self._gwlb_src = ipaddress.IPv4Address(gwlb_src).packed
        self._gwlb_dst = ipaddress.IPv4Address(gwlb_dst).packed
        self._ids = (endpoint_id, attachment_id)
        # flow -> (source port, conversation key): computed once per flow, not per packet
        self._known: dict[Flow | None, tuple[int, bytes]] = {None: (_PORT_BASE, b"")}

    @property
    def port(self) -> int:
        """The UDP port the datagrams this encapsulates belong on."""
        return GENEVE_PORT if self.encap == "geneve" else VXLAN_PORT

    def mirror(self, record: Record) -> Mirrored | Skip:
        """The datagram for `record`, or why there is none."""
        if self.as_captured:
            outer = outer_datagram(record.linktype, record.data)
            if outer is not None:
                vni, flow = _inner_of_datagram(outer.payload, outer.port)
                return Mirrored(outer.payload, outer.src_port, outer.port, vni, flow, False,
                                outer.cut, self._hashes(flow)[1])
            if self._vxlan is None:
                return Skip.NO_VNI
        frame = ethernet_frame(record)
        if isinstance(frame, Skip):
            return frame
        return self.encapsulate(frame, cut_by_capture=len(record.data) < record.wire_len)

    def encapsulate(self, frame: bytes, *, cut_by_capture: bool = False) -> Mirrored:
        """The datagram for one inner Ethernet frame."""
        flow = flow_of(frame)
        sport, key = self._hashes(flow)
        copy = build.truncate(frame, self.packet_length)
        truncated = len(copy) < len(frame)
        if self.encap == "vxlan":
            return Mirrored(self._vxlan + copy, sport, VXLAN_PORT, self.vni, flow, truncated,
                            cut_by_capture, key)
        options = build.aws_gwlb_options(*self._ids, flow_cookie=zlib.crc32(b"gwlb" + key))
        payload = build.gwlb_mirror(copy, vni=self.vni, outer_src=self._gwlb_src,
                                    outer_dst=self._gwlb_dst, source_port=sport, options=options)
        return Mirrored(payload, sport, GENEVE_PORT, self.vni, flow, truncated, cut_by_capture,
                        key)

    def _hashes(self, flow: Flow | None) -> tuple[int, bytes]:
        """(outer source port, conversation key) of `flow`, from a bounded cache."""
        known = self._known.get(flow)
        if known is None:
            if len(self._known) >= _CACHED_FLOWS:
                self._known.clear()
                self._known[None] = (_PORT_BASE, b"")
            known = self._known[flow] = (source_port(flow), flow.symmetric_key())
        return known


def _inner_of_datagram(payload: bytes, port: int) -> tuple[int | None, Flow | None]:
    """(VNI, inner flow) of a captured mirror datagram. VXLAN (the common case) is read here;
    GENEVE and VXLAN-GPE go through the decoder. A malformed one gives (None, None)."""
    if port == VXLAN_PORT and len(payload) >= 8 and payload[0] & 0x08:
        return int.from_bytes(payload[4:7], "big"), flow_of(memoryview(payload)[8:])
    try:
        pkt = decode_datagram(payload, port)
    except Malformed:
        return None, None
    return pkt.vni, _flow_of_packet(pkt)
