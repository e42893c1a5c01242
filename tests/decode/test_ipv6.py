import pytest

from collector import build
from collector.decode import Malformed, Reason, decode_datagram

SRC, DST = "2001:db8::1", "2001:db8::2"
SEGMENT = build.tcp(b"data", sport=5555, dport=22, flags=build.ACK | build.PSH)


def decode(packet, cut=None):
    frame = build.ethernet(packet, ethertype=0x86DD)
    return decode_datagram(build.vxlan(frame[:cut], vni=1))


def test_plain_ipv6():
    packet = build.ipv6(SEGMENT, src=SRC, dst=DST, traffic_class=0x2E, hop_limit=9)
    pkt = decode(packet)
    assert (pkt.src_ip, pkt.dst_ip, pkt.ip_tos, pkt.ip_ttl) == (SRC, DST, 0x2E, 9)
    assert (pkt.ip_proto, pkt.ip_header_len, pkt.wire_len) == (6, 40, 40 + len(SEGMENT))
    assert (pkt.src_port, pkt.dst_port, pkt.tcp_flags, pkt.is_fragment) == (5555, 22, 0x18, False)


EXTENSIONS = [
    (0, b"\x01\x04\0\0\0\0"),  # hop-by-hop, PadN
    (43, b"\0\0\0\0\0\0" + b"\0" * 16),  # routing with one address
    (60, b"\x01\x04\0\0\0\0"),  # destination options
    (51, b"\0\0" + b"\0" * 12),  # AH: SPI, sequence, 4 bytes ICV (4-octet units)
]


@pytest.mark.parametrize("count", range(1, len(EXTENSIONS) + 1))
def test_extension_chain_is_walked(count):
    packet = build.ipv6(SEGMENT, src=SRC, dst=DST, extensions=EXTENSIONS[:count])
    pkt = decode(packet)
    assert (pkt.ip_proto, pkt.dst_port) == (6, 22)
    assert pkt.ip_header_len == len(packet) - len(SEGMENT)
    assert pkt.wire_len == len(packet) and not pkt.truncated


def test_cut_inside_the_chain_keeps_the_fixed_header():
    packet = build.ipv6(SEGMENT, src=SRC, dst=DST, extensions=EXTENSIONS)
    pkt = decode(packet, 14 + 40 + 9)  # inside the routing header
    assert (pkt.dst_ip, pkt.wire_len, pkt.ip_proto, pkt.dst_port) == (DST, len(packet), None, None)
    assert pkt.truncated


def test_last_next_header_byte_is_enough_for_the_protocol():
    packet = build.ipv6(SEGMENT, src=SRC, dst=DST, extensions=EXTENSIONS[:1])
    pkt = decode(packet, 14 + 40 + 1)
    assert (pkt.ip_proto, pkt.ip_header_len, pkt.src_port) == (6, None, None)


def test_fragments():
    first = build.ipv6(SEGMENT, extensions=[build.ipv6_fragment(0, True, 0xDEADBEEF)])
    later = build.ipv6(b"\0" * 24, extensions=[build.ipv6_fragment(1448, False, 0xDEADBEEF)])
    a, b = decode(first), decode(later)
    assert (a.ip_id, a.frag_offset, a.more_fragments, a.dst_port) == (0xDEADBEEF, 0, True, 22)
    assert (b.ip_id, b.frag_offset, b.is_fragment, b.ip_proto, b.src_port) == (0xDEADBEEF, 1448, True, 6, None)


def test_esp_and_no_next_header_end_the_chain():
    for proto in (50, 59):
        pkt = decode(build.ipv6(b"\0" * 16, next_header=proto))
        assert (pkt.ip_proto, pkt.src_port, pkt.ip_header_len) == (proto, None, 40)


def test_jumbogram_length_is_unknown():
    packet = bytearray(build.ipv6(SEGMENT))
    packet[4:6] = b"\0\0"
    pkt = decode(bytes(packet))
    assert (pkt.wire_len, pkt.truncated, pkt.dst_port) == (None, False, 22)


def test_version_must_match_ethertype():
    with pytest.raises(Malformed) as err:
        decode(build.ipv4(SEGMENT))
    assert err.value.reason is Reason.IP_VERSION


def test_icmpv6():
    pkt = decode(build.ipv6(build.icmp(135, 0, b"\0" * 20, ip_src=SRC, ip_dst=DST), src=SRC,
                            dst=DST, next_header=58))
    assert (pkt.ip_proto, pkt.icmp_type, pkt.icmp_code, pkt.src_port) == (58, 135, 0, None)
