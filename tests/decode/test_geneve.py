import pytest

from collector import build
from collector.decode import Malformed, Reason, decode_datagram

FRAME = build.mirrored_frame(build.FrameSpec(dport=8443)).data


def test_gwlb_delivery_decapsulates_the_inner_vxlan():
    pkt = decode_datagram(build.gwlb_mirror(FRAME, vni=7159709, geneve_vni=0), 6081)
    assert (pkt.encap, pkt.vni, pkt.geneve_vni) == ("geneve-vxlan", 7159709, 0)
    assert pkt.gwlb_endpoint_id == 0x0123456789ABCDEF
    assert pkt.gwlb_attachment_id == 0x0FEDCBA987654321
    assert pkt.gwlb_flow_cookie == 0x1234ABCD
    assert (pkt.captured_len, pkt.ethertype, pkt.dst_port) == (len(FRAME), 0x0800, 8443)
    assert pkt.truncated is False


def test_gwlb_over_ipv6_inner():
    vxlan_udp = build.udp(build.vxlan(FRAME, vni=42), sport=50000, dport=4789)
    inner = build.ipv6(vxlan_udp, next_header=build.UDP)
    pkt = decode_datagram(build.geneve(inner, vni=1, protocol=0x86DD), 6081)
    assert (pkt.encap, pkt.vni, pkt.geneve_vni, pkt.dst_port) == ("geneve-vxlan", 42, 1, 8443)


def test_geneve_ip_packet_that_is_not_vxlan_is_the_inspected_packet():
    ip_packet = FRAME[14:]
    pkt = decode_datagram(build.geneve(ip_packet, vni=99, protocol=0x0800), 6081)
    assert (pkt.encap, pkt.vni, pkt.link, pkt.ethertype) == ("geneve", 99, "ipv4", 0x0800)
    assert (pkt.l3_offset, pkt.dst_port, pkt.captured_len) == (0, 8443, len(ip_packet))


def test_geneve_ethernet_payload():
    pkt = decode_datagram(build.geneve(FRAME, vni=10, protocol=0x6558), 6081)
    assert (pkt.encap, pkt.vni, pkt.link, pkt.eth_src) == ("geneve", 10, "ethernet", FRAME[6:12])
    assert pkt.dst_port == 8443


def test_unknown_protocol_type_is_reported_not_malformed():
    pkt = decode_datagram(build.geneve(b"\x01\x02", vni=10, protocol=0x8847), 6081)
    assert (pkt.link, pkt.ethertype, pkt.captured_len, pkt.ip_version) == ("other", 0x8847, 2, None)


def test_foreign_option_classes_are_skipped():
    options = build.geneve_option(0x0132, 1, b"abcd") + build.geneve_option(0x0108, 3, b"\0\0\0\7")
    pkt = decode_datagram(build.geneve(FRAME[14:], vni=1, options=options), 6081)
    assert pkt.gwlb_flow_cookie == 7 and pkt.gwlb_endpoint_id is None


def test_version_must_be_zero():
    with pytest.raises(Malformed) as err:
        decode_datagram(build.geneve(FRAME, vni=1, version=1), 6081)
    assert err.value.reason is Reason.GENEVE_VERSION


@pytest.mark.parametrize("size", range(8))
def test_short_fixed_header_is_malformed(size):
    with pytest.raises(Malformed) as err:
        decode_datagram(build.gwlb_mirror(FRAME, vni=1)[:size], 6081)
    assert err.value.reason is Reason.GENEVE_TRUNCATED


def test_options_cut_by_the_datagram_are_malformed():
    datagram = build.gwlb_mirror(FRAME, vni=1)
    with pytest.raises(Malformed) as err:
        decode_datagram(datagram[:20], 6081)  # Opt Len says 32 bytes of options
    assert err.value.reason is Reason.GENEVE_TRUNCATED


def test_option_overrunning_opt_len_is_malformed():
    bad = bytes([0x01, 0x08, 0x01, 0x02])  # one word of options whose TLV claims 8 data bytes
    datagram = bytes([0x01, 0, 0x08, 0x00, 0, 0, 1, 0]) + bad + FRAME[14:]
    with pytest.raises(Malformed) as err:
        decode_datagram(datagram, 6081)
    assert (err.value.reason, err.value.offset) == (Reason.GENEVE_OPTION_LENGTH, 8)


def test_vxlan_header_cut_inside_gwlb_is_malformed():
    datagram = build.gwlb_mirror(b"", vni=1)
    with pytest.raises(Malformed) as err:
        decode_datagram(datagram[:-3], 6081)
    assert err.value.reason is Reason.VXLAN_TRUNCATED
