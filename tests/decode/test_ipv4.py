import pytest

from collector import build
from collector.decode import Malformed, Reason, decode_datagram

SEGMENT = build.tcp(b"hello", sport=40000, dport=443, flags=build.SYN | build.ACK)


def decode(packet, cut=None):
    frame = build.ethernet(packet)
    return decode_datagram(build.vxlan(frame[:cut], vni=1))


def test_seed_session_25_bytes_keeps_protocol_and_wire_length():
    packet = build.ipv4(SEGMENT, src="172.31.0.5", dst="172.31.9.9", ttl=63, ident=0x1234)
    pkt = decode(packet, 25)  # PacketLength 25 = 14 Ethernet + 11 IP bytes
    assert (pkt.captured_len, pkt.ip_version, pkt.wire_len) == (25, 4, len(packet))
    assert (pkt.ip_id, pkt.ip_ttl, pkt.ip_proto, pkt.frag_offset) == (0x1234, 63, 6, 0)
    assert (pkt.src_addr, pkt.dst_addr, pkt.src_port, pkt.truncated) == (None, None, None, True)


def test_full_packet():
    packet = build.ipv4(SEGMENT, src="172.31.0.5", dst="172.31.9.9", tos=0xB8)
    pkt = decode(packet)
    assert (pkt.src_ip, pkt.dst_ip, pkt.ip_tos, pkt.ip_header_len) == ("172.31.0.5", "172.31.9.9", 0xB8, 20)
    assert (pkt.src_port, pkt.dst_port, pkt.tcp_flags, pkt.l4_offset) == (40000, 443, 0x12, 34)
    assert (pkt.wire_len, pkt.truncated, pkt.is_fragment) == (len(packet), False, False)


def test_options_move_the_l4_header():
    packet = build.ipv4(SEGMENT, options=b"\x01\x01\x01\x00" * 2)
    pkt = decode(packet)
    assert (pkt.ip_header_len, pkt.l4_offset, pkt.dst_port) == (28, 42, 443)
    cut = decode(packet, 14 + 27)  # options cut: no L4
    assert (cut.dst_addr is not None, cut.src_port, cut.l4_offset) == (True, None, None)


def test_first_fragment_has_ports_later_ones_do_not():
    first = decode(build.ipv4(SEGMENT, more_fragments=True, ident=7))
    later = decode(build.ipv4(b"\0" * 16, frag_offset=1480, ident=7))
    assert (first.is_fragment, first.dst_port, first.ip_id) == (True, 443, 7)
    assert (later.is_fragment, later.frag_offset, later.more_fragments) == (True, 1480, False)
    assert (later.ip_proto, later.src_port, later.tcp_flags, later.l4_offset) == (6, None, None, None)


def test_ethernet_padding_is_not_read_as_l4():
    packet = build.ipv4(b"\x00\x35\x00\x35", proto=build.UDP)  # 4 bytes: ports only
    pkt = decode(packet + b"\x00\x03" * 10)  # padding would make UDP length 3 (malformed)
    assert (pkt.dst_port, pkt.truncated, pkt.wire_len) == (53, False, 24)


def test_tso_zero_total_length_is_unknown_not_malformed():
    pkt = decode(build.ipv4(SEGMENT, total_length=0))
    assert (pkt.wire_len, pkt.truncated, pkt.dst_port) == (None, False, 443)


@pytest.mark.parametrize("first_byte, reason", [(0x45 - 0x40 + 0x50, Reason.IP_VERSION),
                                                (0x65, Reason.IP_VERSION),
                                                (0x44, Reason.IPV4_HEADER_LENGTH),
                                                (0x40, Reason.IPV4_HEADER_LENGTH)])
def test_impossible_first_byte_is_malformed(first_byte, reason):
    packet = bytes([first_byte]) + build.ipv4(SEGMENT)[1:]
    with pytest.raises(Malformed) as err:
        decode(packet)
    assert (err.value.reason, err.value.offset) == (reason, 8 + 14)


def test_total_length_below_header_is_malformed():
    with pytest.raises(Malformed) as err:
        decode(build.ipv4(SEGMENT, total_length=19))
    assert (err.value.reason, err.value.offset) == (Reason.IPV4_TOTAL_LENGTH, 8 + 14 + 2)


def test_one_byte_is_enough_to_judge_the_version():
    with pytest.raises(Malformed):
        decode(b"\x35", None)
    pkt = decode(b"\x45")
    assert (pkt.ip_version, pkt.ip_header_len, pkt.wire_len, pkt.truncated) == (4, 20, None, True)
