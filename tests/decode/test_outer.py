"""From a captured frame to the mirror datagram: every link type, outer VLAN tags and IPv6
extension headers, fragments, cuts at every length, and dpkt's view of the real captures."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import build
from collector.capture import read_capture
from collector.decode import decode_datagram
from collector.decode.outer import MIRROR_PORTS, Outer, outer_datagram
from tests import pcaps

SRC4, DST4 = "10.0.1.10", "10.0.2.20"
SRC6, DST6 = "2001:db8:1::a", "2001:db8:2::14"
PAYLOAD = build.vxlan(build.mirrored_frame(build.FrameSpec()).data, vni=7159709)  # 62 bytes


def udp(port=4789, payload=PAYLOAD, sport=50000, length=None) -> bytes:
    return build.udp(payload, sport=sport, dport=port, length=length)


def ip4(datagram: bytes, **kw) -> bytes:
    return build.ipv4(datagram, src=SRC4, dst=DST4, proto=build.UDP, ttl=255, **kw)


def ip6(datagram: bytes, **kw) -> bytes:
    return build.ipv6(datagram, src=SRC6, dst=DST6, next_header=build.UDP, **kw)


def expected(payload=PAYLOAD, v6=False, port=4789, payload_len=None, sport=50000) -> Outer:
    src, dst = (build._addr(SRC6), build._addr(DST6)) if v6 else (build._addr(SRC4),
                                                                   build._addr(DST4))
    return Outer(port, payload, len(payload) if payload_len is None else payload_len, src, dst,
                 sport)


ETHERNET_V4 = build.ethernet(ip4(udp()))

# -- link types -------------------------------------------------------------------------------

SLL_HEAD = struct.pack("!HHH8s", 0, 1, 6, bytes(8))  # packet type, ARPHRD_ETHER, address
SLL2_HEAD = lambda ethertype: struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, bytes(8))  # noqa: E731

LINK_FRAMES = [
    # (link type, frame, IPv6 outer)
    (1, build.ethernet(ip4(udp())), False),
    (1, build.ethernet(ip6(udp()), ethertype=build.ETH_IPV6), True),
    (113, SLL_HEAD + b"\x08\x00" + ip4(udp()), False),
    (113, SLL_HEAD + b"\x86\xdd" + ip6(udp()), True),
    (113, SLL_HEAD + b"\x81\x00" + b"\x00\x05\x08\x00" + ip4(udp()), False),  # a tag left in
    (276, SLL2_HEAD(0x0800) + ip4(udp()), False),
    (276, SLL2_HEAD(0x86DD) + ip6(udp()), True),
    (0, struct.pack("<I", 2) + ip4(udp()), False),  # little-endian capturing host
    (0, struct.pack(">I", 2) + ip4(udp()), False),  # big-endian capturing host
    (0, struct.pack("<I", 24) + ip6(udp()), True),  # NetBSD/OpenBSD AF_INET6
    (0, struct.pack(">I", 28) + ip6(udp()), True),  # FreeBSD
    (0, struct.pack("<I", 30) + ip6(udp()), True),  # Darwin
    (108, struct.pack(">I", 2) + ip4(udp()), False),
    (12, ip4(udp()), False),
    (14, ip6(udp()), True),
    (101, ip4(udp()), False),
    (101, ip6(udp()), True),
    (228, ip4(udp()), False),
    (229, ip6(udp()), True),
]


@pytest.mark.parametrize(("linktype", "frame", "v6"), LINK_FRAMES)
def test_each_link_type(linktype, frame, v6):
    assert outer_datagram(linktype, frame) == expected(v6=v6)


@pytest.mark.parametrize(("linktype", "frame"), [
    (0, struct.pack("<I", 10) + ip6(udp())),  # Linux AF_INET6 is not a BSD loopback family
    (0, struct.pack("<I", 2) + ip6(udp())),  # the family says IPv4, the packet is IPv6
    (113, SLL_HEAD + b"\x08\x06" + ip4(udp())),  # ARP
    (228, ip6(udp())),  # LINKTYPE_IPV4 carrying IPv6
    (229, ip4(udp())),
    (101, b"\x50" + ip4(udp())[1:]),  # version 5
    (101, b""),
    (147, ip4(udp())),  # a link type we do not read (USER0)
])
def test_wrong_family_or_link_type(linktype, frame):
    assert outer_datagram(linktype, frame) is None


@pytest.mark.parametrize("vlans", [
    (5,), ((0x88A8, 0, 100), (0x8100, 0, 200)), ((0x9100, 3, 7),), (1, 2, 3, 4),
])
def test_outer_vlan_tags(vlans):
    frame = build.ethernet(ip4(udp()), vlans=vlans)
    assert outer_datagram(1, frame) == expected()


def test_vlan_tag_cut():
    frame = build.ethernet(ip4(udp()), vlans=(5,))
    assert outer_datagram(1, frame[:16]) is None


# -- ports --------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [4789, 4790, 6081])
def test_mirror_ports(port):
    assert outer_datagram(1, build.ethernet(ip4(udp(port)))) == expected(port=port)


@pytest.mark.parametrize("port", [8472, 4788, 53, 6082, 0])
def test_other_ports(port):
    assert outer_datagram(1, build.ethernet(ip4(udp(port)))) is None


def test_only_udp():
    segment = build.tcp(PAYLOAD, sport=50000, dport=4789)
    frame = build.ethernet(build.ipv4(segment, src=SRC4, dst=DST4, proto=build.TCP))
    assert outer_datagram(1, frame) is None


# -- lengths --------------------------------------------------------------------------------------


def test_every_cut_of_the_frame():
    """Before the end of the UDP header: None; after it, the bytes present, the length the UDP
    header announces."""
    header_end = 14 + 20 + 8
    for n in range(len(ETHERNET_V4) + 1):
        outer = outer_datagram(1, ETHERNET_V4[:n])
        if n < header_end:
            assert outer is None, n
        else:
            assert outer == expected(payload=PAYLOAD[: n - header_end], payload_len=len(PAYLOAD))
            assert outer.cut == (n < len(ETHERNET_V4))


def test_ethernet_padding_is_not_payload():
    frame = build.ethernet(ip4(udp(payload=b"\x08\0\0\0\0\0\x2a\0")))  # 50 bytes
    padded = frame + bytes(60 - len(frame))
    outer = outer_datagram(1, padded)
    assert outer.payload == b"\x08\0\0\0\0\0\x2a\0"
    assert not outer.cut


def test_udp_length_shorter_than_the_ip_payload():
    datagram = udp(length=8 + 20)  # the UDP header claims 20 of the 62 bytes
    assert outer_datagram(1, build.ethernet(ip4(datagram))) == expected(payload=PAYLOAD[:20])


def test_udp_length_longer_than_the_ip_packet():
    """The IP length bounds the payload: the trailer after the IP packet is not payload."""
    frame = build.ethernet(ip4(udp(length=8 + len(PAYLOAD) + 10))) + b"\xee" * 10
    assert outer_datagram(1, frame) == expected(payload_len=len(PAYLOAD) + 10)


@pytest.mark.parametrize("length", [1, 7])
def test_impossible_udp_length(length):
    assert outer_datagram(1, build.ethernet(ip4(udp(length=length)))) is None


def test_ip_total_length_shorter_than_udp_header():
    assert outer_datagram(1, build.ethernet(ip4(udp(), total_length=24))) is None


def test_ipv4_length_zero_tso():
    frame = build.ethernet(ip4(udp(), total_length=0))
    assert outer_datagram(1, frame) == expected()


def test_ipv6_jumbogram_takes_the_ip_length_or_the_capture():
    jumbo = build.ethernet(ip6(udp(length=0)), ethertype=build.ETH_IPV6)
    jumbo = jumbo[:18] + b"\0\0" + jumbo[20:]  # IPv6 payload length 0 too
    assert outer_datagram(1, jumbo) == expected(v6=True)
    udp_zero = build.ethernet(ip6(udp(length=0)), ethertype=build.ETH_IPV6)
    assert outer_datagram(1, udp_zero + bytes(6)) == expected(v6=True)  # padding excluded


def test_ipv4_options():
    frame = build.ethernet(ip4(udp(), options=b"\x94\x04\0\0"))  # router alert
    assert outer_datagram(1, frame) == expected()


@pytest.mark.parametrize("ihl", [0, 4])
def test_impossible_ihl(ihl):
    packet = bytearray(ip4(udp()))
    packet[0] = 0x40 | ihl
    assert outer_datagram(101, bytes(packet)) is None


# -- fragments and IPv6 extension headers ---------------------------------------------------------


def test_first_ipv4_fragment_carries_the_datagrams_start():
    datagram = udp()
    fragment = ip4(datagram[:48], more_fragments=True, total_length=20 + 48)
    outer = outer_datagram(101, fragment)
    assert outer == expected(payload=PAYLOAD[:40], payload_len=len(PAYLOAD))


def test_non_first_ipv4_fragment():
    assert outer_datagram(101, ip4(udp(), frag_offset=8)) is None


@pytest.mark.parametrize("extensions", [
    [(0, b"\x01\x04\0\0\0\0")],  # hop-by-hop (PadN)
    [(0, b""), (43, b"\0\0" + bytes(4)), (60, bytes(14))],
    [build.ipv6_fragment(0, True, 0x1234)],
    [(60, b""), build.ipv6_fragment(0, False, 7)],
])
def test_ipv6_extension_headers_before_udp(extensions):
    frame = ip6(udp(), extensions=extensions)
    assert outer_datagram(229, frame) == expected(v6=True)


def test_non_first_ipv6_fragment():
    frame = ip6(udp(), extensions=[build.ipv6_fragment(1448, False, 7)])
    assert outer_datagram(229, frame) is None


@pytest.mark.parametrize("next_header", [6, 50, 51, 59, 135])
def test_ipv6_other_next_headers(next_header):
    frame = bytearray(ip6(udp()))
    frame[6] = next_header  # TCP, ESP, AH, no next header, mobility: not a mirror datagram
    assert outer_datagram(229, bytes(frame)) is None


def test_ipv6_extension_header_cut():
    frame = ip6(udp(), extensions=[(0, bytes(14))])  # 16-byte hop-by-hop header
    for n in range(40, 40 + 16 + 8):
        assert outer_datagram(229, frame[:n]) is None, n


# -- never raises ----------------------------------------------------------------------------------

LINK_TYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 9999]


def _check(outer):
    if outer is not None:
        assert outer.port in MIRROR_PORTS
        assert len(outer.payload) <= outer.payload_len
        assert len(outer.src) == len(outer.dst) in (4, 16)


@given(linktype=st.sampled_from(LINK_TYPES), data=st.binary(max_size=120))
def test_random_bytes_never_raise(linktype, data):
    _check(outer_datagram(linktype, data))


@given(linktype=st.sampled_from([t for t, _, _ in LINK_FRAMES]), data=st.data())
def test_mutated_frames_never_raise(linktype, data):
    """Random bytes are mostly rejected at the first byte: mutate valid frames instead, so the
    deeper paths (tags, extension headers, UDP lengths) see garbage too."""
    frame = bytearray(data.draw(st.sampled_from([f for t, f, _ in LINK_FRAMES if t == linktype])))
    for _ in range(data.draw(st.integers(1, 6))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    _check(outer_datagram(linktype, bytes(frame[:cut])))


def test_accepts_memoryview_and_bytearray():
    assert outer_datagram(1, memoryview(ETHERNET_V4)) == expected()
    assert outer_datagram(1, bytearray(ETHERNET_V4)) == expected()


# -- the real captures --------------------------------------------------------------------------------


def _capture(relative: str):
    path = pcaps.PCAPS_DIR / relative
    if not path.is_file():
        pcaps.unavailable(f"{path} is absent")
    return [outer_datagram(r.linktype, r.data) for r in read_capture(path)]


@pytest.mark.parametrize("path", pcaps.capture_files() or [None],
                         ids=lambda p: "absent" if p is None else pcaps.capture_id(p))
def test_real_captures_agree_with_dpkt(path):
    """Every record: a datagram exactly when dpkt finds UDP to a mirror port, with dpkt's
    payload bytes, ports and UDP length."""
    if path is None:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR}")
    ours = [outer_datagram(r.linktype, r.data) for r in read_capture(path)]
    theirs = [pcaps.udp_datagram(r) for r in pcaps.read_records(path)]
    assert len(ours) == len(theirs)
    for number, (outer, reference) in enumerate(zip(ours, theirs), 1):
        if reference is None or reference.dst_port not in MIRROR_PORTS:
            assert outer is None, number
            continue
        assert outer is not None, number
        assert (outer.port, outer.src_port, outer.payload, outer.payload_len) == (
            reference.dst_port, reference.src_port, reference.payload, reference.udp_length - 8)


def test_real_vxlan():
    outers = _capture("vxlan/tcpdump_vxlan.pcap")
    assert len(outers) == 10 and all(outers)
    assert outers[0] == Outer(4789, outers[0].payload, 106, bytes([192, 168, 203, 1]),
                              bytes([192, 168, 202, 1]), 45149)
    assert outers[0].payload[:8] == bytes.fromhex("0800000000006400")  # VNI 100


def test_real_outer_vlan_tag():
    outers = _capture("vxlan/ndpi_vxlan-vlan-tls.pcap")
    assert len(outers) == 127 and all(outers)
    assert {decode_datagram(o.payload, o.port).vni for o in outers} == {1111}
    assert outers[0].src == bytes([192, 168, 22, 4]) and outers[0].src_port == 60887


def test_real_ipv6_outer():
    (outer,) = _capture("vxlan/tcpdump_gso-ipv6-vxlan-ipv4.pcap")
    assert outer.src == bytes.fromhex("260413804091ce00000000000000000b")
    assert outer.dst == bytes.fromhex("260413804091ce00000000000000000d")
    assert (outer.port, outer.src_port, len(outer.payload), outer.payload_len) == (
        4789, 35971, 6964, 6964)
    assert decode_datagram(outer.payload, outer.port).vni == 5001


def test_real_port_8472_is_not_a_mirror_port():
    outers = _capture("vxlan/tcpdump_vxlan_port_8472.pcap")
    assert outers == [None] * 10


def test_real_snaplen_cut_datagram():
    """Snaplen 176: 134 of the 140 and 160 payload bytes the UDP headers announce."""
    outers = _capture("geneve/zeek_geneve-vxlan-dns-truncated.pcap")
    assert [(o.port, len(o.payload), o.payload_len, o.cut) for o in outers] == [
        (6081, 134, 140, True), (6081, 134, 160, True)]
    assert outers[0].src == outers[0].dst == bytes([127, 0, 0, 1])


def test_real_bsd_loopback_datagrams_with_the_port_relabelled():
    """The QUIC capture (link type 0, IPv6, snaplen 256) carries UDP to 443: with the
    destination port rewritten to 4789 every record is a mirror datagram."""
    path = pcaps.PCAPS_DIR / "snaplen" / "tcpdump_quic_handshake_truncated-snap256.pcap"
    if not path.is_file():
        pcaps.unavailable(f"{path} is absent")
    records = list(read_capture(path))
    assert {r.linktype for r in records} == {0}
    for record in records:
        udp_at = 4 + 40
        assert record.data[udp_at + 2 : udp_at + 4] in (b"\x01\xbb", b"\xfe\x8d")
        ports = b"\x12\xb5" * 2  # both ports: 4789, whichever direction
        relabelled = record.data[:udp_at] + ports + record.data[udp_at + 4 :]
        outer = outer_datagram(0, relabelled)
        udp_len = int.from_bytes(record.data[udp_at + 4 : udp_at + 6], "big")
        assert outer.payload_len == udp_len - 8
        assert outer.payload == record.data[udp_at + 8 : udp_at + udp_len]
