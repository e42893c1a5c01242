import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from collector.query import connect, inet_extension_path
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CONTRACT = ("vni, session_id, network_interface_id, collector_id, ip_version, protocol, src_addr, "
            "dst_addr, src_port, dst_port, first_seen, last_seen, packets, bytes, rev_packets, "
            "rev_bytes, captured_bytes, truncated_packets, tcp_flags, rev_tcp_flags, end_reason, "
            "community_id").split(", ")
UTC = dt.timezone.utc


def test_an_empty_dataset_has_empty_typed_views(tmp_path):
    con = connect(tmp_path / "absent")
    for view in ("flows", "packets", "sessions", "conversations", "vpc_flow_logs"):
        assert con.sql(f"SELECT count(*) FROM {view}").fetchone() == (0,)
    assert [c[0] for c in con.sql("DESCRIBE flows").fetchall()][: len(FLOWS)] == FLOWS.names


@pytest.mark.parametrize("version", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_every_golden_schema_version_stays_readable(version):
    con = connect(GOLDEN / version)
    names = [c[0] for c in con.sql("DESCRIBE flows").fetchall()]
    assert set(CONTRACT) <= set(names)
    row = con.sql("SELECT src_addr, dst_port, packets, bytes, rev_bytes, end_reason, date, hour "
                  "FROM flows WHERE protocol = 6").fetchone()
    assert row == ("10.0.0.1", 443, 5, 1500, 3000, "fin", dt.date(2026, 1, 1), 0)
    assert con.sql("SELECT count(*) FROM flows WHERE src_addr IS NULL").fetchone() == (1,)


def test_cidr_questions_are_one_expression():
    if inet_extension_path() is None:
        pytest.skip("duckdb-extension-inet is not installed for this DuckDB version")
    con = connect(GOLDEN / "v1")
    assert con.sql("SELECT count(*) FROM flows WHERE src_addr::INET <<= '10.0.0.0/16'::INET").fetchone() == (1,)
    assert con.sql("SELECT count(*) FROM flows WHERE in_cidr(src_addr, '10.1.0.0/16')").fetchone() == (0,)


def test_vpc_flow_logs_has_one_row_per_direction_with_aws_names():
    con = connect(GOLDEN / "v1")
    rows = con.sql('SELECT srcaddr, dstaddr, srcport, dstport, packets, bytes, "tcp-flags", '
                   '"interface-id", "start" FROM vpc_flow_logs WHERE protocol = 6 '
                   "ORDER BY srcaddr").fetchall()
    assert rows == [
        ("10.0.0.1", "10.0.0.2", 40000, 443, 5, 1500, 27, "eni-070203f901EXAMPLE", 1767225600),
        ("10.0.0.2", "10.0.0.1", 443, 40000, 4, 3000, 27, "eni-070203f901EXAMPLE", 1767225600),
    ]


def test_conversations_merge_segments_metered_apart(tmp_path):
    t = lambda s: dt.datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC)  # noqa: E731
    segments = [  # one worker saw the client's packets, another the server's, then a later piece
        dict(vni=1, src_addr="10.0.0.1", dst_addr="10.0.0.2", src_port=4000, dst_port=80, protocol=6,
             first_seen=t(0), last_seen=t(5), packets=3, bytes=300, rev_packets=0, rev_bytes=0,
             tcp_flags=2, rev_tcp_flags=0, truncated_packets=0, rev_truncated_packets=0,
             collector_id="w1", end_reason="idle"),
        dict(vni=1, src_addr="10.0.0.2", dst_addr="10.0.0.1", src_port=80, dst_port=4000, protocol=6,
             first_seen=t(1), last_seen=t(6), packets=2, bytes=200, rev_packets=0, rev_bytes=0,
             tcp_flags=18, rev_tcp_flags=0, truncated_packets=1, rev_truncated_packets=0,
             collector_id="w2", end_reason="fin"),
        dict(vni=2, src_addr="10.0.0.1", dst_addr="10.0.0.2", src_port=4000, dst_port=80, protocol=6,
             first_seen=t(0), last_seen=t(1), packets=1, bytes=100, rev_packets=1, rev_bytes=50,
             tcp_flags=2, rev_tcp_flags=18, truncated_packets=0, rev_truncated_packets=0,
             collector_id="w1", end_reason="idle"),
    ]
    writer = DatasetWriter(tmp_path, "flows", collector_id="c")
    writer.write(pa.Table.from_pylist(segments, schema=FLOWS))
    writer.flush()
    rows = connect(tmp_path).sql(
        "SELECT vni, src_addr, src_port, packets, bytes, rev_packets, rev_bytes, tcp_flags, "
        "rev_tcp_flags, truncated_packets, segments, collectors, end_reason FROM conversations "
        "ORDER BY vni").fetchall()
    assert rows == [(1, "10.0.0.1", 4000, 3, 300, 2, 200, 2, 18, 1, 2, 2, "fin"),
                    (2, "10.0.0.1", 4000, 1, 100, 1, 50, 2, 18, 0, 1, 1, "idle")]


def test_files_added_after_connecting_are_seen(tmp_path):
    writer = DatasetWriter(tmp_path, "flows", collector_id="c")
    row = {"vni": 1, "first_seen": dt.datetime(2026, 1, 1, tzinfo=UTC), "packets": 1}
    writer.write(pa.Table.from_pylist([row], schema=FLOWS))
    writer.flush()
    con = connect(tmp_path)
    writer.write(pa.Table.from_pylist([row], schema=FLOWS))
    writer.flush()
    assert con.sql("SELECT count(*) FROM flows").fetchone() == (2,)
