import struct

import pytest

from collector import build
from collector.decode import Malformed, Reason, decode_datagram


def decode(l4, proto, cut=None):
    frame = build.ethernet(build.ipv4(l4, proto=proto))
    return decode_datagram(build.vxlan(frame[:cut], vni=1))


def test_tcp_flags_include_ns():
    pkt = decode(build.tcp(flags=0x100 | build.SYN | build.ACK), build.TCP)
    assert pkt.tcp_flags == 0x112


@pytest.mark.parametrize("cut, sport, dport, flags", [(34, None, None, None), (36, 40000, None, None),
                                                       (38, 40000, 443, None), (47, 40000, 443, None),
                                                       (48, 40000, 443, 0x02)])
def test_tcp_fields_appear_with_their_bytes(cut, sport, dport, flags):
    pkt = decode(build.tcp(), build.TCP, cut)
    assert (pkt.src_port, pkt.dst_port, pkt.tcp_flags) == (sport, dport, flags)


def test_tcp_data_offset_below_5_is_malformed():
    segment = bytearray(build.tcp())
    segment[12] = 0x40
    with pytest.raises(Malformed) as err:
        decode(bytes(segment), build.TCP)
    assert (err.value.reason, err.value.offset) == (Reason.TCP_HEADER_LENGTH, 8 + 34 + 12)


@pytest.mark.parametrize("length", range(1, 8))
def test_udp_length_below_8_is_malformed(length):
    with pytest.raises(Malformed) as err:
        decode(build.udp(b"abcd", length=length), build.UDP)
    assert err.value.reason is Reason.UDP_LENGTH


def test_udp_length_zero_is_tolerated():
    assert decode(build.udp(b"abcd", length=0), build.UDP).dst_port == 53


@pytest.mark.parametrize("proto", [132, 33, 136])  # SCTP, DCCP, UDP-Lite share the port layout
def test_other_port_protocols(proto):
    pkt = decode(struct.pack("!HH", 3868, 3869) + b"\0" * 8, proto)
    assert (pkt.ip_proto, pkt.src_port, pkt.dst_port) == (proto, 3868, 3869)


@pytest.mark.parametrize("proto", [47, 50, 89, 112])  # GRE, ESP, OSPF, VRRP: no ports
def test_protocols_without_ports(proto):
    pkt = decode(b"\0" * 24, proto)
    assert (pkt.ip_proto, pkt.src_port, pkt.dst_port, pkt.icmp_type) == (proto, None, None, None)


def test_icmp_type_and_code():
    pkt = decode(build.icmp(3, 13, b"\0" * 28), build.ICMP)
    assert (pkt.icmp_type, pkt.icmp_code, pkt.src_port) == (3, 13, None)
    assert decode(build.icmp(3, 13), build.ICMP, 35).icmp_code is None
