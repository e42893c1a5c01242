"""collector._fastcapture against the reference path of collector.ingest.

The compiled walker must do exactly what `read_capture` + `outer_datagram` + `_route` do:
the same batches (every byte of every row, lengths, present bytes, timestamps, the no-VNI
flag) fed in the same order, the same clock ticks, the same counters, and on a faulty file
the same CaptureError (offset and message) after the same records. Checked here on generated
captures of every format variant and link type, with snaplen-cut records, mutated and
truncated files, on the real captures of ../shared/pcaps, and end to end (`ingest` into
Parquet) with COLLECTOR_PURE_PYTHON switching between the two.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from collector import ingest as ingest_module
from collector.capture import CaptureError
from collector.compiled import extension
from collector.flows import FlowConfig
from collector.ingest import HEADER_SLOT, IngestResult, ingest
from collector.pipeline import Pipeline
from collector.query import connect
from tests import pcaps
from tests.test_capture import block, epb, idb, obsolete_pb, option, pcap_bytes, shb, spb

FAST = extension("_fastcapture")
if FAST is None:  # the pure-Python install (or COLLECTOR_PURE_PYTHON=1): nothing to compare
    pytestmark = pytest.mark.skip(reason="collector._fastcapture is not built or switched off")

# Each example writes a capture and walks it twice: a third of the profile's examples (50 in
# the default "fast" profile) keeps the file in seconds; HYPOTHESIS_PROFILE=deep runs more.
SLOW_EXAMPLES = settings(max_examples=max(20, settings().max_examples // 3), deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


# -- running both paths -------------------------------------------------------------------------


def walk(paths, compiled: bool, *, vni=None, width=HEADER_SLOT, batch_rows=3, pause_bytes=None):
    """Everything the walk of `paths` hands on, as plain values: (events, counters, error,
    clock). events: ("feed", port, rows bytes, lengths, present, ts, no_vni) and
    ("tick", clock), in order."""
    events = []

    def feed(slots):
        n = slots.rows
        events.append(("feed", slots.port, slots.buf[:n].tobytes(), slots.lengths[:n].tolist(),
                       slots.present[:n].tolist(), slots.ts[:n].tolist(),
                       slots.no_vni[:n].tolist()))

    batches = ingest_module._Batches(width, vni, feed, lambda clock: events.append(("tick", clock)),
                                     batch_rows)
    result = IngestResult()
    error = None
    try:
        for path in paths:
            done = None
            if compiled:
                options = {} if pause_bytes is None else {"pause_bytes": pause_bytes}
                done = ingest_module._walk_compiled(FAST, path, batches, result, None, **options)
            if done is None:
                ingest_module._walk_records(path, batches, result, None)
    except CaptureError as e:
        error = (e.path, e.offset, e.detail, str(e))
    batches.feed_all()
    counters = (result.records, result.mirror_datagrams, result.plain_packets, result.skipped)
    return events, counters, error, (batches.clock, batches.next_tick)


def assert_same_walk(paths, **options):
    reference = walk(paths, compiled=False, **options)
    compiled = walk(paths, compiled=True, **options)
    assert compiled[2] == reference[2]  # the error first: the clearest message
    assert compiled[1] == reference[1]
    assert compiled[3] == reference[3]
    assert len(compiled[0]) == len(reference[0])
    for ours, theirs in zip(compiled[0], reference[0]):
        assert ours == theirs
    return reference


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A file that each hypothesis example rewrites (function-scoped tmp_path is not allowed)."""
    return tmp_path_factory.mktemp("fastcapture") / "capture"


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# -- frames of every link type ------------------------------------------------------------------

MIRROR_PORTS = (4789, 4790, 6081)
OTHER_LINKTYPES = (9, 105, 147, 192, 0xFFFF)  # no IP link layer collector reads


@st.composite
def udp_datagram(draw, valid: bool) -> bytes:
    """UDP to a mirror port with its true length when `valid`, else anything goes."""
    payload = draw(st.binary(max_size=260))
    if valid:
        port, udp_len = draw(st.sampled_from(MIRROR_PORTS)), 8 + len(payload)
    else:
        port = draw(st.one_of(st.sampled_from(MIRROR_PORTS), st.integers(0, 65535)))
        mode = draw(st.sampled_from(("exact", "zero", "tiny", "any")))
        udp_len = {"exact": 8 + len(payload), "zero": 0, "tiny": draw(st.integers(1, 7)),
                   "any": draw(st.integers(0, 65535))}[mode] & 0xFFFF
    return struct.pack("!HHHH", draw(st.integers(0, 65535)), port, udp_len, 0) + payload


@st.composite
def ipv4_packet(draw, valid: bool) -> bytes:
    options = draw(st.binary(max_size=12))
    options += bytes(-len(options) % 4)
    ihl = 5 + len(options) // 4
    proto = 17 if valid else draw(st.sampled_from((17, 17, 6, 1, 0)))
    body = draw(udp_datagram(valid)) if proto == 17 else draw(st.binary(max_size=40))
    total = 20 + len(options) + len(body)
    # a first fragment (MF, offset 0) carries a UDP header: it is taken
    flags = draw(st.sampled_from((0, 0x4000, 0x2000)))
    if not valid:
        ihl = draw(st.sampled_from((ihl, ihl, 0, 4, 15)))
        flags = draw(st.sampled_from((flags, 0x0001, 0x1FFF, draw(st.integers(0, 0xFFFF)))))
        total = draw(st.sampled_from((total, max(total - draw(st.integers(1, 40)), 0),
                                      draw(st.integers(0, 65535)))))
    else:
        total = draw(st.sampled_from((total, total, 0)))  # 0: TSO left it to the NIC
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total & 0xFFFF, 1, flags, 64, proto, 0,
                         b"\x0a\0\1\x0a", b"\x0a\0\2\x14")
    return header + options + body


@st.composite
def ipv6_packet(draw, valid: bool) -> bytes:
    chain = draw(st.lists(st.sampled_from((0, 43, 60, 44)), max_size=3))
    last = 17 if valid else draw(st.sampled_from((17, 17, 6, 59)))
    headers = b""
    for kind, following in zip(chain, chain[1:] + [last]):
        if kind == 44:  # fragment: offset 0 (a first fragment) or, invalid, not
            offset = 0 if valid else draw(st.sampled_from((0, 1, 0x1FFF))) << 3
            headers += struct.pack("!BBHI", following, 0, offset | draw(st.integers(0, 1)), 7)
        else:
            units = draw(st.integers(0, 2))
            headers += struct.pack("!BB", following, units) + draw(
                st.binary(min_size=6 + 8 * units, max_size=6 + 8 * units))
    body = draw(udp_datagram(valid)) if last == 17 else draw(st.binary(max_size=40))
    length = len(headers) + len(body)
    if valid:
        length = draw(st.sampled_from((length, length, 0)))  # 0: a jumbogram
    else:
        length = draw(st.sampled_from((length, max(length - draw(st.integers(1, 30)), 0),
                                       draw(st.integers(0, 65535)))))
    first = chain[0] if chain else last
    return (struct.pack("!IHBB", 0x60000000, length, first, 64) + bytes(15) + b"\1" + bytes(15)
            + b"\2" + headers + body)


@st.composite
def network_packet(draw) -> tuple[int, bytes]:
    """(ethertype, bytes): IPv4 or IPv6 (mostly mirror datagrams), or ARP, LLDP, noise."""
    kind = draw(st.sampled_from(("4", "4", "6", "6", "other")))
    valid = draw(st.integers(0, 2)) < 2
    if kind == "4":
        return 0x0800, draw(ipv4_packet(valid))
    if kind == "6":
        return 0x86DD, draw(ipv6_packet(valid))
    return draw(st.sampled_from((0x0806, 0x88CC, 0x0800, 0x86DD))), draw(st.binary(max_size=60))


@st.composite
def vlan_tags(draw) -> tuple[bytes, int]:
    """(the tags, the TPID of the first) before an ethertype; (b"", None) for none."""
    tpids = draw(st.lists(st.sampled_from((0x8100, 0x88A8, 0x9100)), max_size=2))
    return tpids


def tagged(tpids, ethertype: int) -> bytes:
    """The ethertype field(s): each TPID followed by a TCI, then the real ethertype."""
    if not tpids:
        return struct.pack("!H", ethertype)
    out = struct.pack("!H", tpids[0])
    for following in tpids[1:] + [ethertype]:
        out += struct.pack("!HH", 5, following)
    return out


@st.composite
def frame(draw, linktype: int) -> bytes:
    """A frame of `linktype`, whole or cut anywhere (a snaplen)."""
    # (hypothesis leans to the smallest choices: the rare branches sit on the largest)
    if draw(st.integers(0, 12)) == 12:
        data = draw(st.binary(max_size=80))  # anything at all
    else:
        ethertype, packet = draw(network_packet())
        if linktype in (228, 229) and draw(st.integers(0, 5)) < 5:  # mostly the version it says
            valid = draw(st.booleans())
            packet = draw(ipv4_packet(valid) if linktype == 228 else ipv6_packet(valid))
        tpids = draw(vlan_tags())
        if linktype == 1:
            data = bytes(12) + tagged(tpids, ethertype) + packet
        elif linktype == 113:
            data = struct.pack("!HHH8s", 0, 1, 6, b"\1" * 8) + tagged(tpids, ethertype) + packet
        elif linktype == 276:
            field = tagged(tpids, ethertype)
            data = field[:2] + bytes(2) + struct.pack("!IHBB8s", 1, 1, 0, 6, b"\1" * 8) + field[
                2:] + packet
        elif linktype in (0, 108):
            family = draw(st.sampled_from((2, 24, 28, 30, 7))) if ethertype else 2
            if ethertype == 0x0800 and draw(st.booleans()):
                family = 2
            data = struct.pack(draw(st.sampled_from(("<I", ">I"))), family) + packet
        else:  # raw IP link types, and the ones collector does not read
            data = packet
    if draw(st.integers(0, 5)) == 5:
        data += bytes(draw(st.integers(1, 20)))  # Ethernet padding, an FCS: past the IP length
    if draw(st.integers(0, 3)) == 3:
        data = data[: draw(st.integers(0, len(data)))]  # a snaplen
    return data


LINKTYPES = (1, 1, 1, 113, 276, 0, 108, 12, 14, 101, 228, 229) + OTHER_LINKTYPES[:2]
ANY_LINKTYPE = st.one_of(st.sampled_from(LINKTYPES), st.sampled_from(OTHER_LINKTYPES))


@st.composite
def timestamps(draw, count: int) -> list[int]:
    """Seconds-ish steps, sometimes jumps past the 1 s tick, sometimes backwards."""
    t = draw(st.integers(0, 2**31))
    out = []
    for _ in range(count):
        t = max(0, t + draw(st.sampled_from((0, 1, 1, 2, -3, 30))))
        out.append(t)
    return out


@st.composite
def pcap_capture(draw) -> bytes:
    linktype = draw(ANY_LINKTYPE)
    frames = draw(st.lists(frame(linktype), max_size=12))
    order = draw(st.sampled_from(("<", ">")))
    nano = draw(st.booleans())
    seconds = draw(timestamps(len(frames)))
    fractions = draw(st.lists(st.integers(0, 10**9 - 1 if nano else 10**6 - 1),
                              min_size=len(frames), max_size=len(frames)))
    records = [(s, f, data, len(data) + draw(st.integers(0, 3)))
               for s, f, data in zip(seconds, fractions, frames)]
    fcs_bits = draw(st.sampled_from((0, 0, 0x10000000)))
    return pcap_bytes(records, magic=0xA1B23C4D if nano else 0xA1B2C3D4, order=order,
                      linktype=linktype | fcs_bits)


@st.composite
def interface(draw, order: str) -> tuple[bytes, int]:
    linktype = draw(st.sampled_from(LINKTYPES))
    options = b""
    if draw(st.booleans()):
        resolution = draw(st.sampled_from((3, 6, 9, 0, 12, 0x80 | 10, 0x80 | 30, 0x80 | 127, 100)))
        options += option(9, bytes([resolution]), order)
    if draw(st.integers(0, 3)) == 3:  # the last two: beyond what int64 nanoseconds hold
        seconds = draw(st.sampled_from((0, 1, -1, 10**6, 2**30, -(2**30), 2**40, -(2**62))))
        options += option(14, struct.pack(order + "q", seconds), order)
    snaplen = draw(st.sampled_from((0, 0, 40, 65535)))
    return idb(linktype, snaplen=snaplen, options=options, order=order), linktype


@st.composite
def pcapng_capture(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 2))):
        order = draw(st.sampled_from(("<", ">")))
        out += shb(order)
        linktypes = []
        interfaces = draw(st.integers(0, 8))
        for _ in range(0 if interfaces == 8 else 1 + interfaces % 3):
            block_bytes, linktype = draw(interface(order))
            out += block_bytes
            linktypes.append(linktype)
        t = draw(st.integers(0, 2**52))
        for _ in range(draw(st.integers(0, 10))):
            kind = draw(st.sampled_from(("epb", "epb", "epb", "spb", "pb", "unknown", "idb")))
            iface = draw(st.integers(0, len(linktypes) - 1)) if linktypes else 0
            if draw(st.integers(0, 60)) == 60:
                iface = len(linktypes)  # undeclared: an error
            linktype = linktypes[iface] if iface < len(linktypes) else 1
            data = draw(frame(linktype))
            t += draw(st.sampled_from((0, 1, 1000, 10**6, 3 * 10**9, -5000)))
            t = max(t, 0)
            if kind == "epb":
                out += epb(data, t, interface=iface, order=order,
                           wire_len=len(data) + draw(st.integers(0, 2)))
            elif kind == "spb":
                out += spb(data, len(data) + draw(st.integers(0, 3)), order)
            elif kind == "pb":
                out += obsolete_pb(data, t, interface=iface, order=order)
            elif kind == "idb":
                block_bytes, linktype = draw(interface(order))
                out += block_bytes
                linktypes.append(linktype)
            else:
                out += block(draw(st.sampled_from((4, 5, 0x80000001, 0xBAD))),
                             draw(st.binary(max_size=20)), order)
    return out


@st.composite
def mutated(draw, capture) -> bytes:
    """The capture, maybe with a few bytes overwritten and maybe cut anywhere."""
    content = bytearray(draw(capture))
    for _ in range(draw(st.sampled_from((0, 0, 1, 3)))):
        if content:
            content[draw(st.integers(0, len(content) - 1))] = draw(st.integers(0, 255))
    if content and draw(st.integers(0, 2)) == 2:
        content = content[: draw(st.integers(0, len(content)))]
    return bytes(content)


# -- generated captures -------------------------------------------------------------------------


@SLOW_EXAMPLES
@given(content=pcap_capture(), vni=st.sampled_from((None, 7)), width=st.sampled_from((192, 320)),
       batch_rows=st.integers(1, 4))
def test_pcap_walks_identically(scratch, content, vni, width, batch_rows):
    assert_same_walk([write(scratch, content)], vni=vni, width=width, batch_rows=batch_rows)


@SLOW_EXAMPLES
@given(content=pcapng_capture(), batch_rows=st.integers(1, 4))
def test_pcapng_walks_identically(scratch, content, batch_rows):
    assert_same_walk([write(scratch, content)], batch_rows=batch_rows)


@SLOW_EXAMPLES
@given(content=mutated(st.one_of(pcap_capture(), pcapng_capture())),
       pause=st.sampled_from((None, 1, 40)))
def test_mutated_and_cut_captures_walk_identically(scratch, content, pause):
    """Same records, then the same error at the same offset, whatever the damage."""
    assert_same_walk([write(scratch, content)], pause_bytes=pause)


@SLOW_EXAMPLES
@given(first=pcap_capture(), second=pcapng_capture(), vni=st.sampled_from((None, 99)))
def test_state_carries_across_files(tmp_path_factory, first, second, vni):
    """Rows, clock and next tick go from one file to the next, C or Python alike."""
    directory = tmp_path_factory.mktemp("two")
    paths = [write(directory / "a", first), write(directory / "b", second)]
    assert_same_walk(paths, vni=vni, batch_rows=2)


@given(raw=st.binary(max_size=64))
def test_any_bytes_at_all(scratch, raw):
    assert_same_walk([write(scratch, raw)])


# -- errors, by name ----------------------------------------------------------------------------

T0 = 1767225600
# Ethernet / IPv4 / UDP 4789 / a VXLAN header and nothing inside: 50 bytes
VXLAN_FRAME = (bytes(12) + b"\x08\x00" + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 0, 0, 64, 17, 0,
                                                        bytes(4), bytes(4))
               + struct.pack("!HHHH", 1, 4789, 16, 0) + b"\x08" + bytes(7))


@pytest.mark.parametrize("content, offset, detail", [
    (b"", 0, "not a pcap or pcapng file: no bytes at offset 0"),
    (b"\x0a\x0d", 0, "not a pcap or pcapng file: magic 0x0a0d at offset 0"),
    (b"GIF89a....", 0, "not a pcap or pcapng file: magic 0x47494638 at offset 0"),
    (pcap_bytes([])[:10], 0, "pcap file header at offset 0 is cut: 10 of 24 bytes"),
    (pcap_bytes([(T0, 0, VXLAN_FRAME)]) + struct.pack("<IIII", T0, 0, 0xFFFFFFFF, 60), 90,
     "record 2 at offset 90 has caplen 4294967295, more than the 262144 bytes a pcap record "
     "can hold"),
    (pcap_bytes([(T0, 0, VXLAN_FRAME)] * 2)[:-1], 90,
     "record 2 at offset 90 is cut: caplen 50, 49 bytes left"),
    (pcap_bytes([(T0, 0, VXLAN_FRAME)] * 2)[:95], 90,
     "record 2 at offset 90 is cut: 5 bytes left, its header needs 16"),
    (shb() + idb() + epb(VXLAN_FRAME, 0, caplen=1 << 30), 48,
     "record 1 at offset 48 has caplen 1073741824, more than the 262144 bytes a packet record "
     "can hold"),
    (shb() + block(0xBAD, b"x", length=1 << 31), 28,
     "block (type 0x00000bad) at offset 28 is cut: block length 2147483648, 16 bytes left"),
    (shb() + idb() + epb(VXLAN_FRAME, 0)[:-3], 48,
     "record 1 at offset 48 is cut: block length 84, 81 bytes left"),
])
def test_errors_are_the_readers(tmp_path, content, offset, detail):
    path = write(tmp_path / "bad", content)
    _, _, error, _ = assert_same_walk([path])
    assert error == (str(path), offset, detail, f"{path}: {detail}")


def test_timestamps_beyond_64_bits_are_refused_alike(tmp_path):
    """if_tsoffset of 2**62 s: no int64 of nanoseconds holds it; both paths stop there."""
    content = (shb() + idb(options=option(14, struct.pack("<q", 2**62))) + epb(VXLAN_FRAME, 0))
    path = write(tmp_path / "far.pcapng", content)
    _, counters, error, _ = assert_same_walk([path])
    assert counters == (0, 0, 0, 0)
    assert error[1:3] == (64, "record 1 at offset 64 has a timestamp outside what 64-bit "
                              "nanoseconds hold (years 1677 to 2262)")


def test_a_pipe_is_read_the_python_way(tmp_path):
    """A file that cannot be mapped (here a FIFO) goes through the reference reader."""
    content = pcap_bytes([(T0 + i, 0, VXLAN_FRAME) for i in range(5)])
    reference = walk([write(tmp_path / "plain.pcap", content)], compiled=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(content))
    writer.start()
    try:
        assert walk([fifo], compiled=True) == reference
    finally:
        writer.join(timeout=10)


# -- the real captures --------------------------------------------------------------------------


def real_captures():
    return pcaps.capture_files()


def test_real_captures_walk_identically():
    files = real_captures()
    if not files:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR}")
    for path in files:
        events, counters, error, _ = assert_same_walk([path], batch_rows=16)
        assert error is None, path
        assert counters[0] > 0, path
    assert_same_walk(files, batch_rows=4096)  # one ingest of all: the clock runs across files


def ingest_tables(paths, data: Path, monkeypatch, *, pure: bool, packets: bool, vni=None):
    monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "1" if pure else "0")
    pipeline = Pipeline(data, collector_id="t", flow_config=FlowConfig(), packets=packets,
                        packet_bytes=128)
    result = ingest(paths, pipeline, vni=vni)
    con = connect(data)
    try:
        tables = {"flows": con.sql("SELECT * EXCLUDE (collector_id) FROM flows ORDER BY ALL")
                  .fetchall()}
        if packets:
            tables["packets"] = con.sql("SELECT * EXCLUDE (collector_id) FROM packets "
                                        "ORDER BY ALL").fetchall()
    finally:
        con.close()
    counters = pipeline.counters
    return (result.records, result.mirror_datagrams, result.plain_packets, result.skipped,
            result.bytes_read, counters.decoded, dict(counters.malformed),
            counters.truncated), tables


@pytest.mark.parametrize("packets", [False, True])
def test_real_captures_ingest_identically(tmp_path, monkeypatch, packets):
    files = real_captures()
    if not files:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR}")
    pure = ingest_tables(files, tmp_path / "pure", monkeypatch, pure=True, packets=packets, vni=5)
    compiled = ingest_tables(files, tmp_path / "c", monkeypatch, pure=False, packets=packets,
                             vni=5)
    assert compiled[0] == pure[0]
    assert compiled[1] == pure[1]
    assert len(compiled[1]["flows"]) > 100


def test_progress_adds_up_to_the_file_size(tmp_path, monkeypatch):
    big = VXLAN_FRAME + bytes(100_000)  # 100 kB records: megabytes in few records
    content = pcap_bytes([(T0 + i, 0, big) for i in range(60)])
    path = write(tmp_path / "many.pcap", content)
    told = []
    monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "0")
    result = ingest([path], Pipeline(tmp_path / "data", collector_id="t"), progress=told.append)
    assert result.records == 60
    assert sum(told) == len(content)
    assert len(told) > 1


def test_an_error_keeps_what_came_before_it(tmp_path, monkeypatch):
    """The records before a cut are metered and written, by the compiled path too."""
    content = pcap_bytes([(T0 + i, 0, VXLAN_FRAME) for i in range(10)])[:-7]
    path = write(tmp_path / "cut.pcap", content)
    monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "0")
    pipeline = Pipeline(tmp_path / "data", collector_id="t")
    with pytest.raises(CaptureError) as info:
        ingest([path], pipeline)
    assert info.value.offset == 24 + 9 * 66
    assert pipeline.counters.datagrams == 9


def test_a_file_truncated_while_walked_is_a_cut_record_not_a_crash(tmp_path, monkeypatch):
    """Another process truncating the mapped capture (a rotation, a rewrite) takes its pages
    away: the walk reads them as a cut record (CaptureError after what came before it was
    metered), where reading them used to end the process with SIGBUS."""
    big = VXLAN_FRAME + bytes(40_000)
    records = [(T0 + i, 0, big) for i in range(200)]  # 8 MB
    content = pcap_bytes(records)
    path = write(tmp_path / "rotated.pcap", content)
    record_size = 16 + len(big)
    # Cut at the page boundary before record 51: a mapped file's last page reads as zeros
    # past the end (no SIGBUS), so a record cut inside it would be read with zeros.
    keep = (24 + 50 * record_size) // 4096 * 4096
    told = []

    def progress(n):  # the first report: 1 MiB walked; then the file shrinks under the walk
        told.append(n)
        if len(told) == 1:
            os.truncate(path, keep)

    monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "0")
    pipeline = Pipeline(tmp_path / "data", collector_id="t")
    with pytest.raises(CaptureError) as info:
        ingest([path], pipeline, progress=progress)
    assert "truncated while it was being read" in info.value.detail
    assert info.value.offset == 24 + 50 * record_size
    assert pipeline.counters.datagrams == 50  # every whole record before the cut, metered


def test_a_walk_leaves_sigbus_as_it_found_it(tmp_path):
    """The walker's SIGBUS handler is there only while a walk runs."""
    import signal

    before = signal.getsignal(signal.SIGBUS)
    assert_same_walk([write(tmp_path / "one.pcap", pcap_bytes([(T0, 0, VXLAN_FRAME)]))])
    assert signal.getsignal(signal.SIGBUS) == before
