"""The flow journal: a killed worker's open flows, written once by its successor."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from collector import build
from collector.pipeline import Pipeline
from collector.store import journal
from collector.store.writer import DatasetWriter

S = 1_000_000_000
T0 = 1_790_000_000 * S  # 2026-09-21 13:33:20 UTC


def datagrams(flows: int, packets: int, start_ns: int = T0, sport: int = 40000):
    """`packets` datagrams of each of `flows` UDP flows (client 10.0.x.y:sport+i -> 10.9.9.9:53),
    one every millisecond, as a receive slab."""
    payloads, stamps = [], []
    for n in range(packets):
        for i in range(flows):
            spec = build.FrameSpec(ip_version=4, proto=build.UDP, src=f"10.0.{i >> 8}.{i & 255}",
                                   dst="10.9.9.9", sport=sport + i, dport=53, payload=b"q" * 20)
            payloads.append(build.vxlan(build.mirrored_frame(spec).data, vni=7))
            stamps.append(start_ns + len(stamps) * 1_000_000)
    width = max(map(len, payloads))
    buf = np.zeros((len(payloads), width), np.uint8)
    for row, p in enumerate(payloads):
        buf[row, :len(p)] = np.frombuffer(p, np.uint8)
    return buf, np.array([len(p) for p in payloads], np.int64), np.array(stamps, np.int64)


def pipeline(root, **options) -> Pipeline:
    return Pipeline(root, collector_id="c1", writer_id="w0", flush_seconds=10, journal=True,
                    **options)


def stored(root) -> list[dict]:
    files = sorted(root.glob("flows/date=*/hour=*/*.parquet"))
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda r: (r["src_port"], r["first_seen"]))


def test_a_killed_workers_open_flows_are_written_once_by_its_successor(tmp_path):
    killed = pipeline(tmp_path)
    killed.feed(*datagrams(flows=3, packets=4))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)  # a flush interval: pending rows written, flows journaled
    path = journal.journal_path(tmp_path, "c1", "w0")
    assert path.exists() and stored(tmp_path) == []
    killed.feed(*datagrams(flows=3, packets=1, start_ns=T0 + S))  # lost with the process
    del killed  # SIGKILL: nothing more happens

    assert journal.recover(tmp_path, "c1", "w0") == 3
    rows = stored(tmp_path)
    assert [(r["src_port"], r["packets"], r["end_reason"]) for r in rows] == [
        (40000, 4, "crash"), (40001, 4, "crash"), (40002, 4, "crash")]
    assert not path.exists() and journal.recover(tmp_path, "c1", "w0") == 0


def test_a_successor_killed_while_recovering_writes_the_same_files_again(tmp_path):
    killed = pipeline(tmp_path)
    killed.feed(*datagrams(flows=2, packets=3))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)
    path = journal.journal_path(tmp_path, "c1", "w0")
    saved = path.read_bytes()
    assert journal.recover(tmp_path, "c1", "w0") == 2
    claimed = path.with_name(path.name + ".claimed-1")
    claimed.write_bytes(saved)  # killed after its files, before removing the claimed journal
    assert journal.claimed(tmp_path, "c1", "w0") == [claimed]
    assert journal.recover(tmp_path, "c1", "w0") == 2
    assert journal.claimed(tmp_path, "c1", "w0") == []
    assert [r["packets"] for r in stored(tmp_path)] == [3, 3]  # replaced, not added


def test_flows_that_reached_a_file_after_the_journal_are_not_written_twice(tmp_path):
    killed = pipeline(tmp_path)
    killed.feed(*datagrams(flows=3, packets=2))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)
    # between two journals the flows ended and the writer wrote them (its size bound, or
    # the instant between a flush and the journal after it), then the kill: the journal
    # still holds them open
    killed._emit(killed.flows.drain())
    killed._write_ended()
    killed.flow_writer.flush()
    assert len(stored(tmp_path)) == 3
    assert journal.recover(tmp_path, "c1", "w0") == 0  # all three reached a file: none twice
    assert [(r["packets"], r["end_reason"]) for r in stored(tmp_path)] == [(2, "shutdown")] * 3


def test_only_the_flows_in_later_files_are_dropped(tmp_path):
    killed = pipeline(tmp_path)
    killed.feed(*datagrams(flows=2, packets=2))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)
    table, sequence = journal.read_journal(journal.journal_path(tmp_path, "c1", "w0"))
    one = table.filter(table.column("src_port").to_numpy() == 40001)
    writer = DatasetWriter(tmp_path, "flows", collector_id="c1", writer_id="w0")
    writer.write(one.replace_schema_metadata(None))
    writer.close()
    # a file of another writer, or of ours from before the journal, fences nothing
    other = DatasetWriter(tmp_path, "flows", collector_id="c1", writer_id="w1")
    other.write(table.replace_schema_metadata(None))
    other.close()
    assert journal.recover(tmp_path, "c1", "w0") == 1
    ports = sorted((r["src_port"], r["end_reason"]) for r in stored(tmp_path))
    assert ports == [(40000, "crash"), (40000, "crash"), (40001, "crash"), (40001, "crash")]


def test_a_clean_close_removes_the_journal_and_a_failed_one_keeps_it(tmp_path):
    clean = pipeline(tmp_path)
    clean.feed(*datagrams(flows=1, packets=2))
    clean.tick(T0, wall=0.0)
    clean.tick(T0, wall=10.0)
    assert journal.journals(tmp_path, "c1") == {"w0": journal.journal_path(tmp_path, "c1", "w0")}
    clean.close()
    assert journal.journals(tmp_path, "c1") == {}
    assert [(r["packets"], r["end_reason"]) for r in stored(tmp_path)] == [(2, "shutdown")]


def test_the_journal_waits_for_pending_rows_and_keeps_closed_flows_reasons(tmp_path):
    p = pipeline(tmp_path)
    syn = build.FrameSpec(ip_version=4, proto=build.TCP, src="10.0.0.1", dst="10.9.9.9",
                          sport=5555, dport=443, tcp_flags=build.RST)
    frame = build.vxlan(build.mirrored_frame(syn).data, vni=7)
    buf = np.frombuffer(frame, np.uint8)[None, :].copy()
    p.feed(buf, np.array([len(frame)]), np.array([T0]))
    p.tick(T0, wall=0.0)
    p.tick(T0, wall=10.0)
    table, _ = journal.read_journal(journal.journal_path(tmp_path, "c1", "w0"))
    assert table.column("end_reason").to_pylist() == ["rst"]  # its close was seen


def test_an_unreadable_journal_is_set_aside_not_fatal(tmp_path):
    path = journal.journal_path(tmp_path, "c1", "w3")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ARROW1 cut short")
    assert journal.recover(tmp_path, "c1", "w3") == 0
    (aside,) = path.parent.glob("*.unreadable")
    assert not path.exists() and journal.claimed(tmp_path, "c1", "w3") == []
    with pytest.raises(ValueError, match="not a readable flow journal"):
        journal.read_journal(aside)


def test_the_journal_is_invisible_to_queries(tmp_path):
    from collector.query import connect

    p = pipeline(tmp_path)
    p.feed(*datagrams(flows=2, packets=1))
    p.tick(T0, wall=0.0)
    p.tick(T0, wall=10.0)
    p.flow_writer.flush()
    con = connect(tmp_path)
    try:
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (0,)
    finally:
        con.close()


def test_with_an_object_store_later_files_already_uploaded_are_found_there(tmp_path, s3_store):
    import pyarrow.fs as pafs

    spool = tmp_path / "spool"
    killed = Pipeline(spool, collector_id="c1", writer_id="w0", flush_seconds=10, journal=True)
    killed.feed(*datagrams(flows=2, packets=2))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)
    killed._emit(killed.flows.drain())
    killed._write_ended()
    (written,) = killed.flow_writer.flush()
    # the uploader sent the file and removed it from the spool, then the kill
    relative = written.relative_to(spool).as_posix()
    s3 = s3_store.filesystem()
    pafs.copy_files(str(written), f"{s3_store.bucket}/{s3_store.prefix}/{relative}",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    written.unlink()
    store = (s3, f"{s3_store.bucket}/{s3_store.prefix}")
    assert journal.recover(spool, "c1", "w0", store=store) == 0  # in the store: not twice
    assert list(spool.glob("flows/**/*.parquet")) == []


def test_a_claimed_journal_frees_the_name_for_the_successors_own(tmp_path):
    killed = pipeline(tmp_path)
    killed.feed(*datagrams(flows=2, packets=1))
    killed.tick(T0, wall=0.0)
    killed.tick(T0, wall=10.0)
    (claimed,) = journal.claim(tmp_path, "c1", "w0")
    successor = pipeline(tmp_path)
    successor.feed(*datagrams(flows=1, packets=1, start_ns=T0 + 5 * S, sport=50000))
    successor.tick(T0 + 5 * S, wall=100.0)
    successor.tick(T0 + 5 * S, wall=110.0)  # its own journal, beside the claimed one
    assert journal.journals(tmp_path, "c1") == {"w0": journal.journal_path(tmp_path, "c1", "w0")}
    assert journal.recover_claimed(claimed, tmp_path, "c1", "w0") == 2
    successor.close()
    assert [(r["src_port"], r["end_reason"]) for r in stored(tmp_path)] == [
        (40000, "crash"), (40001, "crash"), (50000, "shutdown")]
    assert journal.journals(tmp_path, "c1") == {} and journal.claimed(tmp_path, "c1", "w0") == []


def test_journaling_never_calls_pyarrow_compute():
    """Its first call costs a process 44 MiB of RSS (a live worker journals every flush
    interval: the hostile-traffic run's memory bound caught it). The compiled path, which
    serve runs; the pure-Python one builds rows with pa.array, which imports pandas."""
    import subprocess
    import sys
    from pathlib import Path

    from collector.flows import fast

    if not fast.available():
        pytest.skip("the compiled flow table is not built")
    code = """import sys, tempfile
from collector.pipeline import Pipeline
from tests.store.test_journal import datagrams, T0
p = Pipeline(tempfile.mkdtemp(), collector_id='c', writer_id='w0', journal=True)
p.feed(*datagrams(flows=3, packets=2))
p.tick(T0, wall=0.0)
p.tick(T0, wall=10.0)
assert p.compiled and p.data_dir and len(p.flows) == 3
assert 'pyarrow.compute' not in sys.modules, 'pyarrow.compute imported'
from collector.store import journal
assert journal.recover(p.data_dir, 'c', 'w0') == 3  # nothing written since: no compute
assert 'pyarrow.compute' not in sys.modules, 'pyarrow.compute imported by recovery'
"""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
