import pytest

from collector import build
from collector.decode import Malformed, Reason, decode_datagram

FRAME = build.mirrored_frame(build.FrameSpec()).data


def test_aws_header_gives_vni_and_no_reserved_bits():
    pkt = decode_datagram(build.vxlan(FRAME, vni=7159709))
    assert (pkt.encap, pkt.vni, pkt.reserved_bits) == ("vxlan", 7159709, False)
    assert pkt.captured_len == len(FRAME)


@pytest.mark.parametrize("vni", [0, 1, 0xABCDEF, 0xFFFFFF])
def test_vni_extremes(vni):
    assert decode_datagram(build.vxlan(FRAME, vni=vni)).vni == vni


@pytest.mark.parametrize("flags", [0x00, 0x04, 0x80, 0xF7])
def test_missing_i_flag_is_malformed(flags):
    with pytest.raises(Malformed) as err:
        decode_datagram(build.vxlan(FRAME, vni=5, flags=flags))
    assert err.value.reason is Reason.VXLAN_NO_VNI_FLAG
    assert err.value.offset == 0


@pytest.mark.parametrize(
    "header",
    [
        dict(flags=0x0C),  # scapy's GPE-style default on 4789: P is reserved here
        dict(flags=0x88),  # GBP G bit
        dict(flags=0x08, reserved=b"\0\x12\x34"),
        dict(flags=0x08, reserved_low=1),
    ],
)
def test_reserved_bits_are_tolerated_and_reported(header):
    pkt = decode_datagram(build.vxlan(FRAME, vni=11, **header))
    assert pkt.reserved_bits is True
    assert (pkt.vni, pkt.ethertype, pkt.dst_port) == (11, 0x0800, 443)


@pytest.mark.parametrize("size", range(8))
def test_header_shorter_than_8_bytes_is_malformed(size):
    with pytest.raises(Malformed) as err:
        decode_datagram(build.vxlan(FRAME, vni=1)[:size])
    assert err.value.reason is Reason.VXLAN_TRUNCATED


def test_header_alone_is_an_empty_truncated_copy():
    pkt = decode_datagram(build.vxlan(b"", vni=9))
    assert (pkt.vni, pkt.captured_len, pkt.truncated, pkt.ethertype) == (9, 0, True, None)


def test_gpe_next_protocol_ipv4_has_no_ethernet_header():
    ip_packet = FRAME[14:]
    datagram = build.vxlan(ip_packet, vni=3, flags=0x0C, reserved=b"\0\0\x01")
    pkt = decode_datagram(datagram, 4790)
    assert (pkt.encap, pkt.gpe_next_protocol, pkt.link) == ("vxlan-gpe", 1, "ipv4")
    assert (pkt.ethertype, pkt.l3_offset, pkt.dst_port) == (0x0800, 0, 443)
    assert pkt.eth_src is None


@pytest.mark.parametrize("next_protocol, link", [(0, "ethernet"), (3, "ethernet"), (4, "other")])
def test_gpe_other_next_protocols(next_protocol, link):
    datagram = build.vxlan(FRAME, vni=3, flags=0x0C, reserved=bytes([0, 0, next_protocol]))
    pkt = decode_datagram(datagram, 4790)
    assert pkt.link == link
    assert (pkt.dst_port is not None) == (link == "ethernet")


def test_gpe_version_must_be_zero():
    with pytest.raises(Malformed) as err:
        decode_datagram(build.vxlan(FRAME, vni=3, flags=0x18), 4790)
    assert err.value.reason is Reason.VXLAN_GPE_VERSION


def test_unknown_port_is_a_programming_error():
    with pytest.raises(ValueError, match="port 8472"):
        decode_datagram(build.vxlan(FRAME, vni=3), 8472)


def test_customer_vxlan_inside_is_payload():
    customer = build.mirrored_frame(build.FrameSpec(proto=build.UDP, dport=4789)).data
    inner = build.vxlan(customer, vni=77)
    frame = build.ethernet(build.ipv4(build.udp(inner, sport=1234, dport=4789), proto=build.UDP))
    pkt = decode_datagram(build.vxlan(frame, vni=5))
    assert (pkt.vni, pkt.ip_proto, pkt.src_port, pkt.dst_port) == (5, 17, 1234, 4789)
