"""The conversations view across appliances: flow segments written by different collector ids
(each holding one direction, or pieces of a long flow cut by the active timeout) merge into one
row per conversation, as if one appliance had seen it all."""

from __future__ import annotations

import datetime as dt
import zlib
from pathlib import Path

import dpkt
import pyarrow as pa
import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.query import connect
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
FIN, SYN, RST, ACK = 1, 2, 4, 16


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def segment(collector, src, dst, sport, dport, first, last, packets, bytes_, *, flags=ACK,
            rev=(0, 0, 0), end="active", vni=42, protocol=6, **extra):
    rev_packets, rev_bytes, rev_flags = rev
    return dict(vni=vni, collector_id=collector, ip_version=4, protocol=protocol,
                src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport,
                first_seen=at(first), last_seen=at(last), packets=packets, bytes=bytes_,
                rev_packets=rev_packets, rev_bytes=rev_bytes, tcp_flags=flags,
                rev_tcp_flags=rev_flags, truncated_packets=0, rev_truncated_packets=0,
                captured_bytes=bytes_, rev_captured_bytes=rev_bytes, end_reason=end, **extra)


def write(root, rows):
    """Each collector id's rows through its own writer, as separate appliances would."""
    for collector in sorted({r["collector_id"] for r in rows}):
        writer = DatasetWriter(root, "flows", collector_id=collector)
        writer.write(pa.Table.from_pylist([r for r in rows if r["collector_id"] == collector],
                                          schema=FLOWS))
        writer.flush()


COLUMNS = ("src_addr, dst_addr, src_port, dst_port, packets, bytes, rev_packets, rev_bytes, "
           "tcp_flags, rev_tcp_flags, segments, collectors, end_reason, first_seen, last_seen")


def conversations(root, where="true"):
    return connect(root).sql(f"SELECT {COLUMNS} FROM conversations WHERE {where} "
                             "ORDER BY first_seen, src_port").fetchall()


def test_one_direction_per_appliance_and_pieces_of_a_long_flow_merge(tmp_path):
    client, server = ("10.0.1.10", 40000), ("10.0.3.30", 443)
    rows = [  # appliance a: the client's packets, cut every 60 s; b: the server's packets
        segment("a", *client[:1], server[0], client[1], server[1], 0, 59.9, 100, 10_000, flags=SYN | ACK),
        segment("a", client[0], server[0], client[1], server[1], 60, 119.9, 100, 10_000),
        segment("a", client[0], server[0], client[1], server[1], 120, 130, 10, 1_000,
                flags=ACK | FIN, end="idle"),
        segment("b", server[0], client[0], server[1], client[1], 0.001, 59.95, 200, 300_000,
                flags=SYN | ACK),
        segment("b", server[0], client[0], server[1], client[1], 60.01, 130.5, 250, 310_000,
                flags=ACK | FIN, end="idle"),
    ]
    write(tmp_path, rows)
    assert conversations(tmp_path) == [
        ("10.0.1.10", "10.0.3.30", 40000, 443, 210, 21_000, 450, 610_000,
         SYN | ACK | FIN, SYN | ACK | FIN, 5, 2,
         "fin",  # each appliance saw one FIN and ended 'idle': together, a FIN close
         at(0), at(130.5))]


def test_the_earliest_segment_names_the_initiator_whichever_appliance_wrote_it(tmp_path):
    rows = [segment("b", "10.0.3.30", "10.0.1.10", 443, 40000, 0.5, 1, 3, 300, flags=SYN | ACK),
            segment("a", "10.0.1.10", "10.0.3.30", 40000, 443, 0.4, 1, 2, 100, flags=SYN)]
    write(tmp_path, rows)
    [row] = conversations(tmp_path)
    assert row[:8] == ("10.0.1.10", "10.0.3.30", 40000, 443, 2, 100, 3, 300)


def test_a_tie_in_first_seen_goes_to_the_side_that_sent_the_syn(tmp_path):
    for order in ("ab", "ba"):  # whatever the order in which the files are read
        root = tmp_path / order
        rows = [segment("b", "10.0.3.30", "10.0.1.10", 443, 40000, 0, 1, 3, 300, flags=SYN | ACK),
                segment("a", "10.0.1.10", "10.0.3.30", 40000, 443, 0, 1, 2, 100, flags=SYN)]
        write(root, rows if order == "ab" else rows[::-1])
        assert conversations(root)[0][:4] == ("10.0.1.10", "10.0.3.30", 40000, 443)


def test_a_reused_five_tuple_after_a_long_silence_is_another_conversation(tmp_path):
    rows = [segment("a", "10.0.1.10", "10.0.0.2", 5353, 53, 0, 0.01, 1, 60, protocol=17, flags=0,
                    rev=(1, 120, 0), end="idle"),
            segment("b", "10.0.1.10", "10.0.0.2", 5353, 53, 3600, 3600.01, 1, 60, protocol=17,
                    flags=0, rev=(1, 90, 0), end="idle")]
    write(tmp_path, rows)
    assert [(r[4], r[7], r[10]) for r in conversations(tmp_path)] == [(1, 120, 1), (1, 90, 1)]
    # the gap is a variable: an hour joins them
    con = connect(tmp_path)
    con.execute("SET VARIABLE conversation_gap = INTERVAL 2 HOUR")
    assert con.sql("SELECT count(*), sum(segments) FROM conversations").fetchone() == (1, 2)


def test_the_same_packets_mirrored_under_two_vnis_stay_two_conversations(tmp_path):
    """Both ends are mirror sources: each packet arrives twice, once per session. Merging
    them would count every packet twice."""
    rows = [segment("a", "10.0.1.10", "10.0.3.30", 40000, 80, 0, 1, 5, 500, vni=42),
            segment("b", "10.0.1.10", "10.0.3.30", 40000, 80, 0.00005, 1, 5, 500, vni=43)]
    write(tmp_path, rows)
    assert connect(tmp_path).sql("SELECT vni, packets FROM conversations ORDER BY vni").fetchall() == [
        (42, 5), (43, 5)]


def test_rst_wins_and_otherwise_the_last_segment_says_how_it_ended(tmp_path):
    rows = [segment("a", "10.0.1.10", "10.0.3.30", 40001, 80, 0, 10, 5, 500, end="rst"),
            segment("b", "10.0.3.30", "10.0.1.10", 80, 40001, 0.1, 11, 5, 500, end="idle"),
            segment("a", "10.0.1.10", "10.0.3.30", 40002, 80, 0, 10, 5, 500, end="active"),
            segment("b", "10.0.3.30", "10.0.1.10", 80, 40002, 0.1, 10, 5, 500, end="idle")]
    write(tmp_path, rows)
    reasons = connect(tmp_path).sql(
        "SELECT src_port, end_reason FROM conversations ORDER BY src_port").fetchall()
    assert reasons == [(40001, "rst"), (40002, "idle")]  # a tie in last_seen: the final one


def test_new_columns_only_add_to_the_old_ones(tmp_path):
    write(tmp_path, [segment("a", "10.0.1.10", "10.0.3.30", 1, 2, 0, 1, 1, 10)])
    names = [c[0] for c in connect(tmp_path).sql("DESCRIBE conversations").fetchall()]
    assert names == [
        "vni", "session_id", "vlan_id", "inner_vlan_id", "ip_version", "protocol", "src_addr",
        "dst_addr", "src_port", "dst_port", "first_seen", "last_seen", "packets", "bytes",
        "rev_packets", "rev_bytes", "truncated_packets", "tcp_flags", "rev_tcp_flags",
        "community_id", "segments", "collectors", "end_reason", "captured_bytes",
        "rev_captured_bytes"]


# -- a real capture split between two appliances as the NLB would split it ----------------------

def appliance_by_outer_flow(frame: bytes) -> int:
    """As an NLB that hashes the outer 5-tuple: the records of one outer flow go to one
    appliance (the two directions of an inner flow have different outer source ports, so they
    may land apart)."""
    ip = dpkt.ethernet.Ethernet(frame).data
    return zlib.crc32(b"%s|%d|%s|%d" % (ip.src, ip.data.sport, ip.dst, ip.data.dport)) % 2


def appliance_by_inner_direction(frame: bytes) -> int:
    """The worst case: every conversation's two directions on different appliances (VXLAN
    records: outer Ethernet / IP / UDP / VXLAN header / the mirrored frame)."""
    inner = dpkt.ethernet.Ethernet(dpkt.ethernet.Ethernet(frame).data.data.data[8:]).data
    ports = (getattr(inner.data, "sport", 0), getattr(inner.data, "dport", 0))
    return int((inner.src, ports[0]) > (inner.dst, ports[1]))


def split(capture: Path, directory: Path, appliance_of) -> list[Path]:
    outputs = [directory / f"appliance-{i}.pcap" for i in range(2)]
    with open(capture, "rb") as source:
        reader = dpkt.pcap.Reader(source)
        sinks = [open(path, "wb") for path in outputs]
        writers = [dpkt.pcap.Writer(sink, snaplen=262144, linktype=reader.datalink()) for sink in sinks]
        for ts, frame in reader:
            writers[appliance_of(frame)].writepkt(frame, ts)
        for sink in sinks:
            sink.close()
    return outputs


@pytest.mark.parametrize("capture,appliance_of", [
    ("full-session.pcap", appliance_by_outer_flow),
    ("gwlb-session.pcap", appliance_by_outer_flow),
    ("full-session.pcap", appliance_by_inner_direction)])
def test_a_capture_split_over_two_appliances_gives_the_conversations_of_one(tmp_path, capture,
                                                                              appliance_of):
    one, two = tmp_path / "one", tmp_path / "two"
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(FIXTURES / capture), "--data", str(one),
                                  "--collector-id", "solo"])
    assert result.exit_code == 0, result.output
    for index, part in enumerate(split(FIXTURES / capture, tmp_path, appliance_of)):
        result = runner.invoke(main, ["ingest", str(part), "--data", str(two),
                                      "--collector-id", f"appliance-{index}"])
        assert result.exit_code == 0, result.output
    assert connect(two).sql("SELECT max(collectors) FROM conversations").fetchone() == (2,), (
        "the split must put some conversation on both appliances")
    compare = "SELECT * EXCLUDE (segments, collectors) FROM conversations ORDER BY ALL"
    assert connect(two).sql(compare).fetchall() == connect(one).sql(compare).fetchall()
