"""The capture reader: the real captures against their census and dpkt, generated files in
every format variant, and each error with the exact offset it names."""

from __future__ import annotations

import struct
from decimal import Decimal

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import capture
from collector.capture import MAX_CAPLEN, CaptureError, Record, read_capture
from tests import pcaps

T0 = 1767225600  # 2026-01-01T00:00:00Z


# -- writers for the generated files (independent of the reader) ----------------------------------


def pcap_bytes(records, *, magic=0xA1B2C3D4, order="<", linktype=1, snaplen=262144):
    """records: (sec, frac, data) or (sec, frac, data, wire_len)."""
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for sec, frac, data, *wire in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), wire[0] if wire else len(data))
        out += data
    return out


def pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def block(block_type: int, body: bytes, order="<", length=None, trailer=None) -> bytes:
    body = pad4(body)
    total = 12 + len(body)
    return (struct.pack(order + "II", block_type, total if length is None else length) + body
            + struct.pack(order + "I", total if trailer is None else trailer))


def shb(order="<", major=1) -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, major, 0, -1), order)


def option(code: int, value: bytes, order="<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + pad4(value)


def idb(linktype=1, snaplen=0, options=b"", order="<") -> bytes:
    if options:
        options += option(0, b"", order)
    return block(1, struct.pack(order + "HHI", linktype, 0, snaplen) + options, order)


def epb(data: bytes, ts: int, interface=0, wire_len=None, order="<", caplen=None) -> bytes:
    body = struct.pack(order + "IIIII", interface, ts >> 32, ts & 0xFFFFFFFF,
                       len(data) if caplen is None else caplen,
                       len(data) if wire_len is None else wire_len) + pad4(data)
    return block(6, body, order)


def spb(data: bytes, wire_len: int, order="<") -> bytes:
    return block(3, struct.pack(order + "I", wire_len) + data, order)


def obsolete_pb(data: bytes, ts: int, interface=0, order="<") -> bytes:
    body = struct.pack(order + "HHIIII", interface, 0, ts >> 32, ts & 0xFFFFFFFF, len(data),
                       len(data)) + data
    return block(2, body, order)


def write(tmp_path, content: bytes, name="x.pcap"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def read_until_error(path):
    """(records delivered, the CaptureError that ended them)."""
    records = []
    with pytest.raises(CaptureError) as info:
        for record in read_capture(path):
            records.append(record)
    return records, info.value


# -- the real captures ------------------------------------------------------------------------------


def real_captures():
    return pcaps.capture_files() or [None]


@pytest.fixture(params=real_captures(), ids=lambda p: "absent" if p is None else pcaps.capture_id(p))
def real(request):
    if request.param is None:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR}")
    if pcaps.census() is None:
        pcaps.unavailable(f"no analysis.jsonl in {pcaps.PCAPS_DIR}")
    return request.param, pcaps.census()[request.param.name]


def test_real_capture_matches_its_census(real):
    path, row = real
    records = list(read_capture(path))
    assert len(records) == row["packets"]
    linktypes = {}
    for r in records:
        linktypes[str(r.linktype)] = linktypes.get(str(r.linktype), 0) + 1
    assert linktypes == row["linktypes"]
    assert sum(len(r.data) < r.wire_len for r in records) == row["truncated_pkts"]
    assert max(len(r.data) for r in records) == row["max_caplen"]
    assert [r.index for r in records] == list(range(len(records)))


def test_real_capture_bytes_match_the_reference_reader(real):
    path, _ = real
    ours = [(r.linktype, r.data) for r in read_capture(path)]
    assert ours == [(r.linktype, r.data) for r in pcaps.read_records(path)]


def test_real_record_offsets(real):
    path, _ = real
    records = list(read_capture(path))
    if path.suffix == ".pcapng":  # each offset is that of an Enhanced Packet Block
        content = path.read_bytes()
        assert {content[r.offset : r.offset + 4] for r in records} <= {b"\6\0\0\0", b"\0\0\0\6"}
        return
    # pcap: the records tile the file after its header
    offsets = [24] + [r.offset + 16 + len(r.data) for r in records]
    assert [r.offset for r in records] == offsets[:-1]
    assert offsets[-1] == path.stat().st_size


# dpkt's pcapng Reader applies the first interface's if_tsresol to every interface; tshark
# gives these for the second interface (microseconds) of the multi-interface capture.
MULTI_INTERFACE_SECOND_IFACE_NS = [
    1767663437111897000, 1767663437126460000, 1767663437128303000, 1767663437140942000,
]


def test_real_timestamps_equal_dpkts(real):
    path, _ = real
    records = list(read_capture(path))
    with open(path, "rb") as f:
        reader = dpkt.pcapng.Reader(f) if path.suffix == ".pcapng" else dpkt.pcap.Reader(f)
        reference = [ts for ts, _ in reader]
    if path.name == "zeek_pcapng-multi-interface.pcapng":
        assert [r.timestamp_ns for r in records if r.interface == 1] == \
            MULTI_INTERFACE_SECOND_IFACE_NS
        pairs = [(r, ts) for r, ts in zip(records, reference) if r.interface == 0]
        assert len(pairs) == 2
    else:
        assert len(reference) == len(records)
        pairs = list(zip(records, reference))
    for record, ts in pairs:
        if isinstance(ts, Decimal):  # dpkt's nanosecond pcap: exact
            assert record.timestamp_ns == int(ts * 10**9)
        else:  # a float: exact to the microsecond
            assert record.timestamp_ns // 1000 == round(ts * 1e6) or (
                abs(record.timestamp_ns - ts * 1e9) < 1000)


def test_real_nanosecond_capture_keeps_nanoseconds():
    path = pcaps.PCAPS_DIR / "linktype" / "tcpdump_tcp-handshake-nano-sll.pcap"
    if not path.is_file():
        pcaps.unavailable(f"{path} is absent")
    records = list(read_capture(path))
    assert {r.linktype for r in records} == {113}
    assert any(r.timestamp_ns % 1000 for r in records)  # sub-microsecond digits survive


def test_real_pcapng_ns_resolution_and_two_interfaces():
    path = pcaps.PCAPS_DIR / "pcapng" / "zeek_pcapng-multi-interface.pcapng"
    if not path.is_file():
        pcaps.unavailable(f"{path} is absent")
    records = list(read_capture(path))
    assert [(r.timestamp_ns, r.interface, r.offset) for r in records[:2]] == [
        (1767663089500330493, 0, 348), (1767663089514291940, 0, 476)]  # if_tsresol 9
    assert [r.interface for r in records] == [0, 0, 1, 1, 1, 1]


# -- classic pcap variants ----------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path, order, nano):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    frames = [(T0, 999_999_999 if nano else 999_999, b"\x01" * 60),
              (T0 + 1, 1, b"\x02" * 1514, 9000)]
    path = write(tmp_path, pcap_bytes(frames, magic=magic, order=order, linktype=113))
    records = list(read_capture(path))
    scale = 1 if nano else 1000
    assert records == [
        Record(T0 * 10**9 + (999_999_999 if nano else 999_999_000), 113, b"\x01" * 60, 60, 24, 0,
               0),
        Record((T0 + 1) * 10**9 + 1 * scale, 113, b"\x02" * 1514, 9000, 24 + 16 + 60, 1, 0),
    ]


def test_big_endian_file_differs_only_in_byte_order(tmp_path):
    frames = [(T0, 5, b"abc"), (T0, 6, b"defg")]
    little = list(read_capture(write(tmp_path, pcap_bytes(frames), "le.pcap")))
    big = list(read_capture(write(tmp_path, pcap_bytes(frames, order=">"), "be.pcap")))
    assert big == little


def test_fcs_bits_are_masked_off_the_link_type(tmp_path):
    # FCS length 2 (in 16-bit words) and the P bit over LINKTYPE_ETHERNET
    path = write(tmp_path, pcap_bytes([(T0, 0, b"x")], linktype=0x2400_0001))
    assert [r.linktype for r in read_capture(path)] == [1]


def test_empty_capture_has_no_records(tmp_path):
    assert list(read_capture(write(tmp_path, pcap_bytes([])))) == []


def test_largest_caplen_is_accepted(tmp_path):
    data = bytes(MAX_CAPLEN)
    records = list(read_capture(write(tmp_path, pcap_bytes([(T0, 0, data)]))))
    assert len(records[0].data) == MAX_CAPLEN


@given(sizes=st.lists(st.integers(0, 300), max_size=30), chunk=st.integers(1, 700))
def test_records_survive_every_chunk_boundary(tmp_path_factory, sizes, chunk):
    frames = [(T0 + i, i, bytes([i % 256]) * size) for i, size in enumerate(sizes)]
    path = tmp_path_factory.mktemp("chunks") / "c.pcap"
    path.write_bytes(pcap_bytes(frames))
    original = capture.CHUNK
    capture.CHUNK = chunk
    try:
        records = list(read_capture(path))
    finally:
        capture.CHUNK = original
    assert [(r.timestamp_ns, r.data) for r in records] == [
        (sec * 10**9 + frac * 1000, data) for sec, frac, data in frames]


def test_every_chunk_size_on_empty_records(tmp_path, monkeypatch):
    """Records of 0 bytes (a header and nothing else) at the end of the file, with the chunk
    boundary at every byte of them."""
    frames = [(T0, 0, b"abc"), (T0, 1, b""), (T0, 2, b""), (T0, 3, b"")]
    path = write(tmp_path, pcap_bytes(frames))
    for chunk in range(1, path.stat().st_size + 1):
        monkeypatch.setattr(capture, "CHUNK", chunk)
        assert [r.data for r in read_capture(path)] == [b"abc", b"", b"", b""], chunk


def test_large_file_is_read_in_chunks(tmp_path):
    # 3 MiB of records of varied sizes: several refills, records straddling them
    frames = [(T0, i, bytes([i % 251]) * (i % 1500)) for i in range(4200)]
    records = list(read_capture(write(tmp_path, pcap_bytes(frames))))
    assert len(records) == 4200
    assert all(r.data == f[2] for r, f in zip(records, frames))


# -- classic pcap errors ------------------------------------------------------------------------


def test_not_a_capture(tmp_path):
    path = write(tmp_path, b'{"TrafficMirrorSessions": []}', "sessions.json")
    with pytest.raises(CaptureError) as info:
        read_capture(path)  # at once, before any iteration
    assert str(info.value) == (
        f"{path}: not a pcap or pcapng file: magic 0x7b225472 at offset 0")
    assert info.value.offset == 0
    assert info.value.path == str(path)


def test_empty_file_is_not_a_capture(tmp_path):
    path = write(tmp_path, b"")
    with pytest.raises(CaptureError, match=r"not a pcap or pcapng file: no bytes at offset 0$"):
        read_capture(path)


def test_file_header_cut(tmp_path):
    path = write(tmp_path, pcap_bytes([])[:10])
    records, error = read_until_error(path)
    assert records == []
    assert str(error) == f"{path}: pcap file header at offset 0 is cut: 10 of 24 bytes"


def test_record_cut_mid_header_keeps_the_records_before(tmp_path):
    content = pcap_bytes([(T0, 0, b"a" * 60), (T0, 1, b"b" * 40)])
    path = write(tmp_path, content + bytes(10))
    records, error = read_until_error(path)
    assert [r.data for r in records] == [b"a" * 60, b"b" * 40]
    offset = 24 + 76 + 56
    assert error.offset == offset
    assert str(error) == (f"{path}: record 3 at offset {offset} is cut: 10 bytes left, "
                          "its header needs 16")


def test_record_cut_mid_data(tmp_path):
    content = pcap_bytes([(T0, 0, b"a" * 60), (T0, 1, b"b" * 1500)])
    path = write(tmp_path, content[:-1300])
    records, error = read_until_error(path)
    assert [r.data for r in records] == [b"a" * 60]
    assert error.offset == 100
    assert str(error) == f"{path}: record 2 at offset 100 is cut: caplen 1500, 200 bytes left"


@pytest.mark.parametrize("caplen", [MAX_CAPLEN + 1, 0xFFFFFFFF])
def test_absurd_caplen_is_refused_before_reading_it(tmp_path, caplen):
    content = pcap_bytes([(T0, 0, b"a" * 60)]) + struct.pack("<IIII", T0, 0, caplen, caplen)
    path = write(tmp_path, content + bytes(100))
    records, error = read_until_error(path)
    assert len(records) == 1
    assert error.offset == 100
    assert str(error) == (f"{path}: record 2 at offset 100 has caplen {caplen}, more than the "
                          "262144 bytes a pcap record can hold")


# -- pcapng -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_enhanced_packets(tmp_path, order):
    content = (shb(order) + idb(1, 0, order=order)
               + epb(b"\x11" * 62, T0 * 10**6 + 5, order=order)
               + epb(b"\x22" * 64, T0 * 10**6 + 6, wire_len=1500, order=order))
    records = list(read_capture(write(tmp_path, content, "x.pcapng")))
    first = 28 + 20
    assert records == [
        Record(T0 * 10**9 + 5000, 1, b"\x11" * 62, 62, first, 0, 0),
        Record(T0 * 10**9 + 6000, 1, b"\x22" * 64, 1500, first + 32 + 64, 1, 0),
    ]


@pytest.mark.parametrize(("tsresol", "ticks", "expected_ns"), [
    (b"\x09", T0 * 10**9 + 123, T0 * 10**9 + 123),  # nanoseconds
    (b"\x03", T0 * 10**3 + 7, T0 * 10**9 + 7_000_000),  # milliseconds
    (b"\x0c", 1999, 1),  # picoseconds (64 bits of them last 213 days): floored to the ns
    (b"\x8a", T0 * 1024 + 512, T0 * 10**9 + 500_000_000),  # 2^-10 s
    (b"\x80", T0, T0 * 10**9),  # 2^0: seconds
])
def test_pcapng_timestamp_resolution(tmp_path, tsresol, ticks, expected_ns):
    content = shb() + idb(options=option(9, tsresol)) + epb(b"x", ticks)
    (record,) = read_capture(write(tmp_path, content, "x.pcapng"))
    assert record.timestamp_ns == expected_ns


def test_pcapng_timestamp_offset(tmp_path):
    options = option(14, struct.pack("<q", T0)) + option(9, b"\x06")
    content = shb() + idb(options=options) + epb(b"x", 2_500_000)
    (record,) = read_capture(write(tmp_path, content, "x.pcapng"))
    assert record.timestamp_ns == (T0 + 2) * 10**9 + 500_000_000


def test_pcapng_interfaces_have_their_own_link_types(tmp_path):
    content = (shb() + idb(1) + idb(101, options=option(9, b"\x09"))
               + epb(b"eth", T0 * 10**6, interface=0) + epb(b"raw", T0 * 10**9 + 1, interface=1))
    records = list(read_capture(write(tmp_path, content, "x.pcapng")))
    assert [(r.linktype, r.interface, r.timestamp_ns) for r in records] == [
        (1, 0, T0 * 10**9), (101, 1, T0 * 10**9 + 1)]


def test_pcapng_simple_packets(tmp_path):
    content = (shb() + idb(1, snaplen=64) + spb(b"\x33" * 64, wire_len=1500)
               + spb(b"\x44" * 42, wire_len=42))
    records = list(read_capture(write(tmp_path, content, "x.pcapng")))
    assert records == [
        Record(0, 1, b"\x33" * 64, 1500, 48, 0, 0),  # min(snaplen, length)
        Record(0, 1, b"\x44" * 42, 42, 48 + 16 + 64, 1, 0),  # the 2 bytes of padding cut off
    ]


def test_pcapng_obsolete_packet_block(tmp_path):
    content = shb() + idb(113) + idb(1) + obsolete_pb(b"\x55" * 30, T0 * 10**6, interface=1)
    (record,) = read_capture(write(tmp_path, content, "x.pcapng"))
    assert record == Record(T0 * 10**9, 1, b"\x55" * 30, 30, 28 + 20 + 20, 0, 1)


def test_pcapng_unknown_blocks_are_skipped(tmp_path):
    statistics = block(5, bytes(20))  # Interface Statistics Block
    custom = block(0x40000BAD, bytes(3 << 20))  # 3 MiB: skipped without being buffered
    name_resolution = block(4, b"\x00\x00\x00\x00")
    content = (shb() + idb() + statistics + epb(b"a", 1) + custom + name_resolution
               + epb(b"b", 2))
    records = list(read_capture(write(tmp_path, content, "x.pcapng")))
    assert [(r.data, r.index) for r in records] == [(b"a", 0), (b"b", 1)]
    assert records[1].offset == len(content) - len(epb(b"b", 2))


def test_pcapng_sections_of_both_byte_orders(tmp_path):
    content = (shb("<") + idb(1, order="<") + epb(b"le", 1, order="<")
               + shb(">") + idb(228, order=">") + epb(b"be", 2, order=">"))
    records = list(read_capture(write(tmp_path, content, "x.pcapng")))
    assert [(r.linktype, r.data, r.timestamp_ns) for r in records] == [
        (1, b"le", 1000), (228, b"be", 2000)]


# -- pcapng errors ------------------------------------------------------------------------------


def test_pcapng_interfaces_end_with_their_section(tmp_path):
    second = 28 + 20 + 36 + 28  # two SHBs, one IDB, one EPB
    content = (shb() + idb() + epb(b"a", 1) + shb(">") + epb(b"b", 2, interface=0, order=">"))
    path = write(tmp_path, content, "x.pcapng")
    records, error = read_until_error(path)
    assert [r.data for r in records] == [b"a"]
    assert error.offset == second
    assert str(error) == (f"{path}: record 2 at offset {second} names interface 0, but its "
                          "section declares 0")


def test_pcapng_undeclared_interface(tmp_path):
    path = write(tmp_path, shb() + idb() + epb(b"a", 1, interface=3), "x.pcapng")
    records, error = read_until_error(path)
    assert str(error) == (f"{path}: record 1 at offset 48 names interface 3, but its section "
                          "declares 1")


def test_pcapng_block_length_not_a_multiple_of_4(tmp_path):
    path = write(tmp_path, shb() + idb() + epb(b"a", 1) + block(5, bytes(8), length=21),
                 "x.pcapng")
    records, error = read_until_error(path)
    assert len(records) == 1
    assert error.offset == 84
    assert str(error) == (f"{path}: block (type 0x00000005) at offset 84 has length 21, "
                          "not a multiple of 4")


def test_pcapng_block_shorter_than_12(tmp_path):
    path = write(tmp_path, shb() + idb() + block(0x0BAD, b"", length=8), "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: block (type 0x00000bad) at offset 48 has length 8, "
                          "smaller than 12")


def test_pcapng_packet_block_shorter_than_its_fields(tmp_path):
    path = write(tmp_path, shb() + idb() + block(6, bytes(8)), "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == f"{path}: record 1 at offset 48 has length 20, smaller than 32"


def test_pcapng_trailing_length_mismatch(tmp_path):
    bad = block(6, struct.pack("<IIIII", 0, 0, 1, 4, 4) + b"abcd", trailer=40)
    path = write(tmp_path, shb() + idb() + epb(b"ok", 1) + bad, "x.pcapng")
    records, error = read_until_error(path)
    assert [r.data for r in records] == [b"ok"]
    assert error.offset == 84
    assert str(error) == (f"{path}: record 2 at offset 84 has trailing length 40, leading "
                          "length 36")


def test_pcapng_skipped_block_trailing_length_mismatch(tmp_path):
    path = write(tmp_path, shb() + block(0x0BAD, bytes(8), trailer=24), "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: block (type 0x00000bad) at offset 28 has trailing length "
                          "24, leading length 20")


def test_pcapng_absurd_caplen(tmp_path):
    bad = epb(b"abcd", 1, caplen=0xFFFFFFF0)
    path = write(tmp_path, shb() + idb() + bad, "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: record 1 at offset 48 has caplen 4294967280, more than the "
                          "262144 bytes a packet record can hold")


def test_pcapng_caplen_beyond_its_block(tmp_path):
    path = write(tmp_path, shb() + idb() + epb(b"abcd", 1, caplen=100), "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: record 1 at offset 48 has caplen 100, more than its "
                          "36-byte block holds")


@pytest.mark.parametrize(("cut", "left"), [(5, 5), (20, 20), (40, 40)])
def test_pcapng_block_cut_at_end_of_file(tmp_path, cut, left):
    last = epb(b"z" * 40, 3)
    content = shb() + idb() + epb(b"a", 1) + last
    path = write(tmp_path, content[: len(content) - len(last) + cut], "x.pcapng")
    records, error = read_until_error(path)
    assert [r.data for r in records] == [b"a"]
    assert error.offset == 84
    if cut < 12:
        assert str(error) == (f"{path}: block at offset 84 is cut: {left} bytes left, the "
                              "smallest block has 12")
    else:
        assert str(error) == f"{path}: record 2 at offset 84 is cut: block length 72, {left} bytes left"


def test_pcapng_skipped_block_cut(tmp_path):
    path = write(tmp_path, shb() + block(0x0BAD, bytes(100))[:50], "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: block (type 0x00000bad) at offset 28 is cut: block length "
                          "112, 50 bytes left")


def test_pcapng_bad_byte_order_magic(tmp_path):
    content = shb() + idb() + b"\x0a\x0d\x0d\x0a" + struct.pack("<II", 28, 0x12345678) + bytes(16)
    path = write(tmp_path, content, "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: section header block at offset 48 has byte-order magic "
                          "0x78563412, neither 1a2b3c4d nor 4d3c2b1a")


def test_pcapng_unknown_major_version(tmp_path):
    path = write(tmp_path, shb(major=2), "x.pcapng")
    _, error = read_until_error(path)
    assert str(error) == (f"{path}: section header block (type 0x0a0d0d0a) at offset 0 has "
                          "pcapng version 2.0: only 1.x exists")


# -- resources ------------------------------------------------------------------------------------


def test_file_is_closed_when_iteration_stops(tmp_path):
    records = read_capture(write(tmp_path, pcap_bytes([(T0, 0, b"a"), (T0, 1, b"b")])))
    next(records)
    stream = records.gi_frame.f_locals["stream"]
    records.close()
    assert stream.f.closed
