"""`decode_capture` and its presentation helpers, on the fixtures and a real snaplen cut."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from collector.capture import CaptureError
from collector.datagrams import (
    Stats,
    decode_capture,
    endpoint,
    iso_time,
    tcp_flag_letters,
)
from collector.decode import Malformed, Packet
from tests import pcaps

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_seed_session():
    stats = Stats()
    decoded = list(decode_capture([FIXTURES / "seed-session.pcap"], stats))
    assert len(decoded) == 18
    record, outer, packet = decoded[4]  # the SYN
    assert (record.index, outer.port, outer.src, outer.payload_len) == (
        4, 4789, bytes([10, 0, 1, 10]), 8 + 25)
    assert (packet.vni, packet.ip_proto, packet.wire_len, packet.captured_len,
            packet.truncated, packet.src_addr) == (7159709, 6, 40, 25, True, None)
    assert stats == Stats(records=18, datagrams=18, decoded=18, malformed=Counter(),
                          truncated=18, capture_cut=0)


def test_several_files_accumulate():
    stats = Stats()
    paths = [FIXTURES / name for name in ("seed-session.pcap", "full-session.pcap",
                                          "gwlb-session.pcap")]
    decoded = list(decode_capture(paths, stats))
    assert [d.packet.vni for d in decoded].count(42) == 25 + 18
    assert (stats.records, stats.datagrams, stats.decoded, stats.truncated) == (81, 81, 81, 18)
    assert all(isinstance(d.packet, Packet) for d in decoded)


def test_snaplen_cut_datagram_is_decoded_at_the_length_aws_sent():
    """Snaplen 176 kept 134 of the 140 payload bytes: the copy AWS sent (96 bytes of frame)
    was whole, so it is not truncated; the capture cut it, which `capture_cut` counts."""
    path = pcaps.PCAPS_DIR / "geneve" / "zeek_geneve-vxlan-dns-truncated.pcap"
    if not path.is_file():
        pcaps.unavailable(f"{path} is absent")
    stats = Stats()
    packets = [d.packet for d in decode_capture([path], stats)]
    assert [(p.captured_len, p.wire_len, p.truncated, p.dst_port) for p in packets] == [
        (96, 82, False, 53), (116, 102, False, 36872)]
    assert (stats.capture_cut, stats.truncated) == (2, 0)


def test_malformed_is_yielded_with_its_reason(tmp_path):
    from tests.test_cli_decode import _mirror, _pcap

    path = tmp_path / "bad.pcap"
    path.write_bytes(_pcap([_mirror(b"\x00" * 8)]))
    stats = Stats()
    (decoded,) = decode_capture([path], stats)
    assert isinstance(decoded.packet, Malformed)
    assert decoded.packet.reason.value == "vxlan_no_vni_flag"
    assert stats.summary() == ("1 records, 1 mirror datagrams: 0 decoded, 1 malformed "
                               "(vxlan_no_vni_flag 1), 0 truncated copies, 0 cut by the capture")


def test_capture_error_after_the_datagrams_before_it(tmp_path):
    content = (FIXTURES / "seed-session.pcap").read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(content[:-1])
    stats = Stats()
    seen = []
    with pytest.raises(CaptureError):
        for decoded in decode_capture([path], stats):
            seen.append(decoded)
    assert len(seen) == stats.datagrams == 17


@pytest.mark.parametrize(("ns", "text"), [
    (1767225600_000000000, "2026-01-01T00:00:00.000000Z"),
    (1767225600_123456999, "2026-01-01T00:00:00.123456Z"),  # truncated, not rounded
    (0, "1970-01-01T00:00:00.000000Z"),
    (-1, "1969-12-31T23:59:59.999999Z"),
    (2**64 * 10**9, str(2**64 * 10**9)),
])
def test_iso_time(ns, text):
    assert iso_time(ns) == text


@pytest.mark.parametrize(("flags", "letters"), [
    (0x02, "S"), (0x12, "SA"), (0x19, "FPA"), (0x04, "R"), (0x1FF, "FSRPAUECN"), (0, "."),
    (None, "-"),
])
def test_tcp_flag_letters(flags, letters):
    assert tcp_flag_letters(flags) == letters


@pytest.mark.parametrize(("addr", "port", "text"), [
    (bytes([10, 0, 0, 1]), 443, "10.0.0.1:443"),
    (bytes([10, 0, 0, 1]), None, "10.0.0.1"),
    (bytes(15) + b"\x01", 443, "[::1]:443"),
    (bytes(15) + b"\x01", None, "::1"),
    (None, None, "?"),
])
def test_endpoint(addr, port, text):
    assert endpoint(addr, port) == text
