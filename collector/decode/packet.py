"""The decoded view of one mirrored packet.

Every field is None when the bytes that carry it were not received (the copy was cut before
them) or do not exist for this packet (ports of an ICMP packet, of a non-first fragment).
Offsets are relative to the first byte of the mirrored frame, i.e. the byte right after the
mirror encapsulation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# ethertypes the decoder follows
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD


@dataclass(slots=True)
class Packet:
    # -- the mirror encapsulation ------------------------------------------------------------
    encap: str = "vxlan"  # vxlan | vxlan-gpe | geneve | geneve-vxlan
    vni: int | None = None  # the mirror session's VNI (VXLAN VNI; GENEVE VNI without VXLAN)
    reserved_bits: bool = False  # reserved bits set in the mirror header (tolerated, counted)
    gpe_next_protocol: int | None = None
    geneve_vni: int | None = None
    gwlb_endpoint_id: int | None = None  # AWS option class 0x0108 type 1 (8 bytes)
    gwlb_attachment_id: int | None = None  # type 2 (8 bytes)
    gwlb_flow_cookie: int | None = None  # type 3 (4 bytes)
    # -- the mirrored frame ------------------------------------------------------------------
    captured_len: int = 0  # bytes of the mirrored frame received (after the mirror headers)
    link: str = "ethernet"  # ethernet | ipv4 | ipv6 | other: what the frame starts with
    eth_dst: bytes | None = None
    eth_src: bytes | None = None
    vlans: tuple[int, ...] = ()  # 802.1Q / 802.1ad VLAN ids, outermost first (complete tags)
    ethertype: int | None = None  # after the tags (None for 802.3/LLC frames, whose field is a
    # length); set from the tunnel for IP-only links
    l3_offset: int | None = None
    ip_version: int | None = None
    ip_header_len: int | None = None  # IPv4 IHL*4; IPv6 40 + extension headers walked
    ip_tos: int | None = None  # IPv4 TOS / IPv6 traffic class
    ip_ttl: int | None = None  # IPv4 TTL / IPv6 hop limit
    ip_id: int | None = None  # IPv4 identification / IPv6 fragment identification
    frag_offset: int | None = None  # bytes; IPv6: 0 when the chain holds no fragment header
    more_fragments: bool | None = None
    ip_proto: int | None = None  # upper-layer protocol (after IPv6 extension headers)
    src_addr: bytes | None = None  # 4 or 16 bytes
    dst_addr: bytes | None = None
    wire_len: int | None = None  # IP-layer bytes on the wire: IPv4 total length / 40 + payload
    l4_offset: int | None = None
    src_port: int | None = None  # TCP, UDP, UDP-Lite, SCTP, DCCP
    dst_port: int | None = None
    tcp_flags: int | None = None  # 9 bits: NS CWR ECE URG ACK PSH RST SYN FIN
    icmp_type: int | None = None  # ICMP and ICMPv6
    icmp_code: int | None = None
    truncated: bool = False  # the copy holds fewer bytes than the packet had on the wire

    @property
    def src_ip(self) -> str | None:
        return _ip_text(self.src_addr)

    @property
    def dst_ip(self) -> str | None:
        return _ip_text(self.dst_addr)

    @property
    def is_fragment(self) -> bool | None:
        """True for any fragment (first or not); None when the fragment fields were cut."""
        if self.frag_offset is None or self.more_fragments is None:
            return None
        return self.frag_offset > 0 or self.more_fragments


def _ip_text(addr: bytes | None) -> str | None:
    return None if addr is None else str(ipaddress.ip_address(addr))
