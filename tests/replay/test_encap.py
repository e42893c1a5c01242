"""From capture records to the datagrams AWS sends: exact VXLAN bytes, truncation, synthesised
Ethernet for other link types, the outer source port per flow, GWLB GENEVE, as-captured."""

from __future__ import annotations

import struct
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import build
from collector.capture import Record, read_capture
from collector.decode import Packet, decode_datagram, decode_frame
from collector.decode.outer import outer_datagram
from collector.replay.encap import (
    Encapsulator,
    Flow,
    Skip,
    ethernet_frame,
    flow_of,
    source_port,
)
from tests.decode.test_datagram import frame_specs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
PCAPS = ROOT.parent / "shared" / "pcaps"
SEED_VNI = 7159709
VXLAN_HEADER = bytes.fromhex("08000000") + SEED_VNI.to_bytes(3, "big") + b"\x00"


def shared(relative: str) -> Path:
    path = PCAPS / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared captures are not here)")
    return path


def record(data: bytes, linktype: int = 1, wire_len: int | None = None, ts: int = 0) -> Record:
    return Record(ts, linktype, data, len(data) if wire_len is None else wire_len, 0, 0)


def frame(**kw) -> bytes:
    return build.mirrored_frame(build.FrameSpec(**kw)).data


# -- VXLAN and truncation ------------------------------------------------------------------------


def test_vxlan_header_is_flags_08_then_the_vni_and_the_whole_frame():
    data = frame(payload=b"hello")
    mirrored = Encapsulator(vni=SEED_VNI).mirror(record(data))
    assert mirrored.payload == b"\x08\x00\x00\x00\x6d\x3f\x9d\x00" + data
    assert mirrored.payload[:8] == VXLAN_HEADER
    assert (mirrored.port, mirrored.vni, mirrored.truncated) == (4789, SEED_VNI, False)
    pkt = decode_datagram(mirrored.payload, 4789)
    assert (pkt.vni, pkt.src_ip, pkt.dst_ip, pkt.src_port, pkt.dst_port) == (
        SEED_VNI, "10.0.0.1", "10.0.0.2", 40000, 443)
    assert not pkt.truncated and not pkt.reserved_bits


JUMBO = frame(payload=bytes(range(256)) * 35)  # 14 + 20 + 20 + 8960 = 9014 bytes


@pytest.mark.parametrize("length", [1, 25, 64, 8500])
def test_packet_length_keeps_exactly_that_many_frame_bytes(length):
    mirrored = Encapsulator(vni=SEED_VNI, packet_length=length).mirror(record(JUMBO))
    assert mirrored.payload == VXLAN_HEADER + JUMBO[:length]
    assert len(mirrored.payload) == 8 + length
    assert mirrored.truncated
    pkt = decode_datagram(mirrored.payload, 4789)
    assert pkt.captured_len == length and pkt.truncated


def test_seed_length_25_keeps_the_ip_length_but_not_the_addresses():
    pkt = decode_datagram(Encapsulator(vni=SEED_VNI, packet_length=25).mirror(
        record(frame(payload=b"x" * 100))).payload, 4789)
    assert (pkt.wire_len, pkt.ip_proto, pkt.src_addr, pkt.truncated) == (140, 6, None, True)


@pytest.mark.parametrize("length", [64, 8500, None])
def test_a_frame_no_longer_than_the_packet_length_is_not_truncated(length):
    data = frame(payload=b"x" * 10)  # 64 bytes
    mirrored = Encapsulator(vni=1, packet_length=length).mirror(record(data))
    assert mirrored.payload[8:] == data and not mirrored.truncated


@pytest.mark.parametrize("length", [0, 8501, -1, 25.0, "25"])
def test_a_packet_length_outside_1_8500_is_refused_clearly(length):
    with pytest.raises(ValueError, match=r"packet length .* outside 1-8500: AWS PacketLength"):
        Encapsulator(vni=1, packet_length=length)


def test_a_vni_is_required_unless_as_captured():
    with pytest.raises(ValueError, match="VNI is required"):
        Encapsulator()
    with pytest.raises(ValueError, match="VNI 16777216 outside"):
        Encapsulator(vni=1 << 24)
    with pytest.raises(ValueError, match="encapsulation 'gre'"):
        Encapsulator(vni=1, encap="gre")


def test_a_record_cut_by_the_capture_snaplen_is_flagged():
    data = frame(payload=b"x" * 100)
    mirrored = Encapsulator(vni=1).mirror(record(data[:60], wire_len=len(data)))
    assert mirrored.cut_by_capture and not mirrored.truncated and mirrored.payload[8:] == data[:60]


# -- link types -------------------------------------------------------------------------------

IP4 = build.ipv4(build.tcp(b"abc", ip_src="10.0.0.1", ip_dst="10.0.0.2"), src="10.0.0.1",
                 dst="10.0.0.2")
IP6 = build.ipv6(build.udp(b"abc", ip_src="fd00::1", ip_dst="fd00::2"), next_header=build.UDP)
SLL = struct.pack("!HHH8s", 0, 1, 6, bytes.fromhex("02000a00010a0000"))
SLL2 = lambda ethertype: struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, bytes(8))  # noqa: E731

LINKS = [
    # (link type, record bytes, ethertype, network layer)
    (113, SLL + b"\x08\x00" + IP4, 0x0800, IP4),
    (113, SLL + b"\x86\xdd" + IP6, 0x86DD, IP6),
    (276, SLL2(0x0800) + IP4, 0x0800, IP4),
    (276, SLL2(0x0806) + b"arp!", 0x0806, b"arp!"),
    (0, struct.pack("<I", 2) + IP4, 0x0800, IP4),
    (0, struct.pack(">I", 30) + IP6, 0x86DD, IP6),
    (108, struct.pack(">I", 24) + IP6, 0x86DD, IP6),
    (101, IP4, 0x0800, IP4),
    (101, IP6, 0x86DD, IP6),
    (12, IP4, 0x0800, IP4),
    (228, IP4, 0x0800, IP4),
    (229, IP6, 0x86DD, IP6),
]


@pytest.mark.parametrize("linktype, data, ethertype, network", LINKS)
def test_other_link_types_get_an_ethernet_header_with_their_ethertype(linktype, data, ethertype,
                                                                      network):
    expected = bytes(12) + ethertype.to_bytes(2, "big") + network
    assert ethernet_frame(record(data, linktype)) == expected
    mirrored = Encapsulator(vni=7).mirror(record(data, linktype))
    assert mirrored.payload == build.vxlan(expected, vni=7)


def test_ethernet_records_go_as_they_are_vlan_tags_included():
    data = frame(vlans=(100, 200))
    assert ethernet_frame(record(data)) == data


@pytest.mark.parametrize("linktype, data, why", [
    (147, IP4, Skip.LINK_TYPE),  # a user DLT: unknown
    (1, b"\x00" * 13, Skip.LINK_TYPE),  # cut inside the Ethernet header
    (113, b"\x00" * 15, Skip.LINK_TYPE),  # cut inside the SLL header
    (0, struct.pack("<I", 99) + IP4, Skip.LINK_TYPE),  # an unknown address family
    (113, SLL[:14] + b"\x00\x04" + b"llc", Skip.NOT_ETHERNET),  # SLL protocol 4: 802.2 LLC
])
def test_records_without_a_frame_are_skipped_with_the_reason(linktype, data, why):
    assert Encapsulator(vni=1).mirror(record(data, linktype)) is why


# (file, link-layer header length, count of records)
SHARED_LINKS = [
    ("linktype/tcpdump_tcp-handshake-nano-sll.pcap", 16, 3),
    ("linktype/zeek_linux_dlt_sll2.pcap", 20, 6),
    ("ipv6/suricata_http-ipv6_dltnull.pcap", 4, 14),
]


@pytest.mark.parametrize("name, header, count", SHARED_LINKS)
def test_real_sll_sll2_and_null_captures_become_ethernet_frames(name, header, count):
    records = list(read_capture(shared(name)))
    assert len(records) == count
    encapsulator = Encapsulator(vni=SEED_VNI)
    for rec in records:
        mirrored = encapsulator.mirror(rec)
        network = rec.data[header:]
        if rec.linktype == 0:
            ethertype = {4: 0x0800, 6: 0x86DD}[network[0] >> 4]
        else:  # SLL: the protocol field ends the header; SLL2: it starts it
            ethertype = int.from_bytes(rec.data[14:16] if header == 16 else rec.data[0:2], "big")
        assert mirrored.payload == VXLAN_HEADER + bytes(12) + ethertype.to_bytes(2, "big") + network
        pkt = decode_datagram(mirrored.payload, 4789)
        assert pkt.ethertype == ethertype
        if ethertype in (0x0800, 0x86DD):
            assert pkt.ip_version == network[0] >> 4 and not pkt.truncated


def test_the_dlt_null_ipv6_capture_keeps_one_source_port_for_its_tcp_flow():
    encapsulator = Encapsulator(vni=1)
    records = list(read_capture(shared("ipv6/suricata_http-ipv6_dltnull.pcap")))
    ports = {encapsulator.mirror(rec).source_port for rec in records}
    assert len(ports) == 1  # 14 packets of one TCP connection, both directions


# -- the outer source port -------------------------------------------------------------------


def test_tcp_both_directions_share_a_port_udp_directions_do_not():
    out = frame(proto=build.TCP, src="10.0.1.10", dst="10.0.3.30", sport=40000, dport=80)
    back = frame(proto=build.TCP, src="10.0.3.30", dst="10.0.1.10", sport=80, dport=40000,
                 tcp_flags=build.SYN | build.ACK)
    e = Encapsulator(vni=1)
    assert e.encapsulate(out).source_port == e.encapsulate(back).source_port
    query = frame(proto=build.UDP, src="10.0.1.10", dst="10.0.0.2", sport=53001, dport=53)
    reply = frame(proto=build.UDP, src="10.0.0.2", dst="10.0.1.10", sport=53, dport=53001)
    assert e.encapsulate(query).source_port != e.encapsulate(reply).source_port


def test_the_port_is_crc32_of_the_flow_in_49152_65535():
    flow = Flow(0x0800, build.UDP, bytes([10, 0, 1, 10]), bytes([10, 0, 0, 2]), 53001, 53)
    key = b"I\x11" + bytes([10, 0, 1, 10]) + (53001).to_bytes(2, "big") + bytes([10, 0, 0, 2]) \
        + (53).to_bytes(2, "big")
    assert flow.hash_key() == key
    assert source_port(flow) == 49152 + (zlib.crc32(key) & 0x3FFF)


def test_every_packet_of_a_real_tcp_flow_has_one_port_in_both_directions():
    e = Encapsulator(vni=1)
    by_flow = defaultdict(set)
    directions = defaultdict(set)
    for rec in read_capture(shared("mixed/arkime_curl-enabled-tls13.pcap")):
        mirrored = e.mirror(rec)
        flow = mirrored.flow
        assert 49152 <= mirrored.source_port <= 65535
        by_flow[(flow.proto, frozenset(((flow.src, flow.sport), (flow.dst, flow.dport))))].add(
            mirrored.source_port)
        directions[(flow.proto, flow.src, flow.sport)].add(mirrored.source_port)
    tcp = {key: ports for key, ports in by_flow.items() if key[0] == build.TCP}
    assert len(tcp) == 1 and all(len(ports) == 1 for ports in tcp.values())
    assert sum(1 for key in directions if key[0] == build.TCP) == 2  # both directions seen
    udp = [ports for key, ports in by_flow.items() if key[0] == build.UDP]
    assert udp and all(len(ports) == 2 for ports in udp)  # DNS: query and reply differ


@given(spec=frame_specs(), cut=st.integers(0, 200))
def test_flow_of_agrees_with_the_decoder_at_every_cut(spec, cut):
    data = build.mirrored_frame(spec).data[: 14 + cut]
    pkt = Packet()
    decode_frame(data, 0, len(data), pkt)
    flow = flow_of(data)
    assert flow_of(memoryview(b"VXLANhdr" + data)[8:]) == flow
    if pkt.ethertype is None:
        assert flow is None
        return
    assert flow.ethertype == pkt.ethertype
    if pkt.src_addr is not None and pkt.dst_addr is not None:
        assert (flow.src, flow.dst) == (pkt.src_addr, pkt.dst_addr)
    if pkt.ip_proto is not None and flow.src:
        assert flow.proto == pkt.ip_proto
    if spec.proto in (build.TCP, build.UDP) and pkt.dst_port is not None:
        assert (flow.sport, flow.dport) == (pkt.src_port, pkt.dst_port)
    if pkt.icmp_type is not None and pkt.icmp_code is not None:
        assert flow.icmp == pkt.icmp_type << 8 | pkt.icmp_code


@given(data=st.binary(max_size=120))
def test_flow_of_never_raises(data):
    flow = flow_of(data)
    if flow is not None:
        source_port(flow)
        flow.symmetric_key()


def test_fragments_and_non_ip_frames_hash_what_they_have():
    first = build.ethernet(build.ipv4(build.udp(b"x" * 16, sport=1, dport=2), proto=build.UDP,
                                      more_fragments=True))
    later = build.ethernet(build.ipv4(b"y" * 16, proto=build.UDP, frag_offset=24))
    assert flow_of(first).sport == 1 and flow_of(later).sport is None
    arp = build.ethernet(b"\x00" * 28, ethertype=build.ETH_ARP)
    flow = flow_of(arp)
    assert (flow.ethertype, flow.src, flow.dst) == (0x0806, build.DEFAULT_SRC_MAC,
                                                    build.DEFAULT_DST_MAC)
    assert 49152 <= source_port(flow) <= 65535


# -- GENEVE as a Gateway Load Balancer delivers it ----------------------------------------------


def test_geneve_wraps_the_vxlan_packet_with_the_aws_options():
    e = Encapsulator(vni=SEED_VNI, encap="geneve", packet_length=64)
    data = frame(payload=b"z" * 200)
    mirrored = e.mirror(record(data))
    assert mirrored.port == 6081 and mirrored.truncated
    pkt = decode_datagram(mirrored.payload, 6081)
    assert (pkt.encap, pkt.vni, pkt.geneve_vni) == ("geneve-vxlan", SEED_VNI, 0)
    assert (pkt.gwlb_endpoint_id, pkt.gwlb_attachment_id) == (0x0123456789ABCDEF,
                                                              0x0FEDCBA987654321)
    key = mirrored.flow.symmetric_key()
    assert pkt.gwlb_flow_cookie == zlib.crc32(b"gwlb" + key)
    assert (pkt.src_ip, pkt.dst_ip, pkt.captured_len, pkt.truncated) == (
        "10.0.0.1", "10.0.0.2", 64, True)
    # GENEVE (8) + options (12 + 12 + 8) + IPv4 (20) + UDP (8, to 4789 from the flow's port)
    # + VXLAN (8) + the copy
    assert mirrored.payload[:4] == bytes([0x08, 0, 0x08, 0x00])  # 8 words of options, IPv4
    udp = mirrored.payload[40 + 20 : 40 + 28]
    assert struct.unpack("!HH", udp[:4]) == (mirrored.source_port, 4789)
    assert mirrored.payload[40 + 28 :] == VXLAN_HEADER + data[:64]


def test_geneve_flow_cookie_is_one_per_conversation():
    e = Encapsulator(vni=1, encap="geneve")
    out = e.encapsulate(frame(proto=build.UDP, sport=5000, dport=53))
    back = e.encapsulate(frame(proto=build.UDP, src="10.0.0.2", dst="10.0.0.1", sport=53,
                               dport=5000))
    cookies = {decode_datagram(m.payload, 6081).gwlb_flow_cookie for m in (out, back)}
    assert len(cookies) == 1


# -- as captured ------------------------------------------------------------------------------


def test_as_captured_resends_each_datagram_unchanged_from_its_port():
    e = Encapsulator(as_captured=True)
    records = list(read_capture(FIXTURES / "full-session.pcap"))
    vnis = set()
    for rec in records:
        outer = outer_datagram(rec.linktype, rec.data)
        mirrored = e.mirror(rec)
        assert (mirrored.payload, mirrored.source_port, mirrored.port) == (
            outer.payload, outer.src_port, 4789)
        assert not mirrored.truncated and not mirrored.cut_by_capture
        assert mirrored.vni == decode_datagram(outer.payload, 4789).vni
        vnis.add(mirrored.vni)
    assert vnis == {42, 43}


def test_as_captured_gwlb_datagrams_keep_geneve_and_their_vni():
    e = Encapsulator(as_captured=True)
    for rec in read_capture(FIXTURES / "gwlb-session.pcap"):
        mirrored = e.mirror(rec)
        assert mirrored.port == 6081 and mirrored.vni == 42
        assert mirrored.payload == outer_datagram(rec.linktype, rec.data).payload
        assert mirrored.flow is not None and mirrored.flow.src


def test_as_captured_plain_packets_need_a_vni():
    plain = record(frame())
    assert Encapsulator(as_captured=True).mirror(plain) is Skip.NO_VNI
    assert Encapsulator(as_captured=True, vni=9).mirror(plain).payload == build.vxlan(
        frame(), vni=9)


def test_without_as_captured_a_mirror_datagram_is_itself_the_mirrored_packet():
    rec = next(read_capture(FIXTURES / "seed-session.pcap"))
    mirrored = Encapsulator(vni=5).mirror(rec)
    assert mirrored.payload == build.vxlan(rec.data, vni=5)
