"""The writer under faults, on real filesystems: a full tmpfs, a read-only remount, a data
directory deleted, writers killed with SIGKILL mid-write. Nothing half-written is ever
visible, no temporary survives a failed write, rows wait (up to a bound) and are written when
the disk works again, and rows dropped past the bound are counted by reason.

The tmpfs tests mount a small tmpfs (root only) and skip cleanly where mounting is not allowed.
"""

import errno
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import datetime as dt
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter, remove_stale_temporaries

UTC = dt.timezone.utc


def rows(count, hour=1, start=0):
    return pa.Table.from_pylist(
        [{"vni": start + i, "first_seen": dt.datetime(2026, 1, 1, hour, 30, tzinfo=UTC),
          "packets": 1, "src_port": i % 65536} for i in range(count)], schema=FLOWS)


def visible(root):
    return sorted(p for p in Path(root).rglob("*.parquet"))


def hidden(root):
    return sorted(p for p in Path(root).rglob(".*") if p.is_file())


def stored_rows(root):
    return sum(pq.read_metadata(p).num_rows for p in visible(root))


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/mnt, unmounted after the test."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount, leave=0):
    """Fill the filesystem (leaving about `leave` bytes); returns the filler file."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    if leave:
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def test_disk_full_writes_nothing_visible_keeps_the_rows_and_writes_them_when_space_returns(tmpfs):
    writer = DatasetWriter(tmpfs / "data", "flows", collector_id="c1", writer_id="w0")
    writer.write(rows(20_000))
    filler = fill(tmpfs)
    with pytest.raises(OSError) as failed:
        writer.flush()
    assert failed.value.errno == errno.ENOSPC
    assert visible(tmpfs / "data") == [] and hidden(tmpfs / "data") == []
    assert writer.pending_rows == 20_000
    assert writer.stats.last_errno == errno.ENOSPC and "No space left" in writer.stats.last_error
    filler.unlink()
    assert len(writer.flush()) == 1
    assert stored_rows(tmpfs / "data") == 20_000 and writer.stats.last_error is None
    assert hidden(tmpfs / "data") == []


def test_past_the_bound_the_oldest_rows_are_dropped_and_counted_never_silently(tmpfs):
    batch = rows(1000).to_batches()[0]
    bound = 5 * batch.nbytes
    writer = DatasetWriter(tmpfs / "data", "flows", collector_id="c1", max_rows=2000,
                           max_pending_bytes=bound, retry_seconds=3600)
    filler = fill(tmpfs)
    for i in range(20):
        writer.write(rows(1000, start=i * 1000), now=float(i))
        assert writer.pending_bytes <= bound
    assert writer.stats.failures == 1  # one try, then it waits retry_seconds: no retry storm
    assert writer.stats.dropped == {"disk_full": 15_000}
    assert writer.pending_rows == 5000
    assert visible(tmpfs / "data") == [] and hidden(tmpfs / "data") == []
    filler.unlink()
    writer.flush()
    assert stored_rows(tmpfs / "data") == 5000  # the newest 5000: 15,000 .. 19,999
    con = duckdb.connect()
    low, high = con.execute(f"SELECT min(vni), max(vni) FROM '{tmpfs}/data/flows/**/*.parquet'").fetchone()
    assert (low, high) == (15_000, 19_999)
    # Each flush writes at most max_rows rows per file: a long backlog is not one huge file.
    assert all(pq.read_metadata(p).num_rows <= 2000 for p in visible(tmpfs / "data"))


def test_automatic_flushes_wait_retry_seconds_after_a_failure(tmpfs):
    writer = DatasetWriter(tmpfs / "data", "flows", collector_id="c1", flush_seconds=1,
                           retry_seconds=5)
    filler = fill(tmpfs)
    writer.write(rows(10), now=0.0)
    writer.tick(now=1.0)
    assert writer.stats.failures == 1
    writer.tick(now=5.9)
    assert writer.stats.failures == 1
    filler.unlink()
    writer.tick(now=6.1)
    assert writer.pending_rows == 0 and stored_rows(tmpfs / "data") == 10


def test_read_only_remount_then_writable_again(tmpfs):
    writer = DatasetWriter(tmpfs / "data", "flows", collector_id="c1")
    (tmpfs / "data").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        writer.write(rows(100))
        with pytest.raises(OSError) as failed:
            writer.flush()
        assert failed.value.errno == errno.EROFS
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert writer.pending_rows == 100 and visible(tmpfs / "data") == []
    writer.flush()
    assert stored_rows(tmpfs / "data") == 100


def test_drop_reason_follows_the_error(tmpfs):
    writer = DatasetWriter(tmpfs / "data", "flows", collector_id="c1", max_pending_bytes=1,
                           retry_seconds=3600)
    (tmpfs / "data").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        writer.write(rows(10), now=0.0)
        writer.write(rows(10), now=0.0)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert writer.stats.dropped == {"read_only": 10} and writer.pending_rows == 10


def test_data_directory_deleted_while_running_is_made_again(tmp_path):
    writer = DatasetWriter(tmp_path / "data", "flows", collector_id="c1")
    writer.write(rows(10))
    writer.flush()
    shutil.rmtree(tmp_path / "data")
    writer.write(rows(10))
    assert len(writer.flush()) == 1 and stored_rows(tmp_path / "data") == 10


def test_a_failure_in_one_partition_makes_no_file_of_another_visible(tmp_path):
    writer = DatasetWriter(tmp_path, "flows", collector_id="c1")
    writer.write(rows(5, hour=1))
    writer.write(rows(5, hour=2))
    blocker = tmp_path / "flows" / "date=2026-01-01" / "hour=02"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the partition directory goes")
    with pytest.raises(OSError):
        writer.flush()
    assert visible(tmp_path) == [] and hidden(tmp_path) == []
    blocker.unlink()
    assert len(writer.flush()) == 2 and stored_rows(tmp_path) == 10


def test_stale_temporaries_of_this_collector_only_are_removed(tmp_path):
    part = tmp_path / "flows" / "date=2026-01-01" / "hour=01"
    part.mkdir(parents=True)
    ours = [part / ".c1-w0-1.parquet.tmp", part / ".c1-w1-2.parquet.tmp"]
    theirs = [part / ".c2-w0-1.parquet.tmp", part / "c1-w0-3.parquet", part / ".c1-note"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, "c1", "w1") == [ours[1]]
    assert sorted(remove_stale_temporaries(tmp_path, "c1")) == [ours[0]]
    assert all(p.exists() for p in theirs)


KILLED_WRITER = textwrap.dedent("""
    import datetime as dt, sys
    import pyarrow as pa
    from collector.store.schema import FLOWS
    from collector.store.writer import DatasetWriter
    writer = DatasetWriter(sys.argv[1], "flows", collector_id="k", writer_id="w0")
    table = pa.Table.from_pylist(
        [{"vni": i, "first_seen": dt.datetime(2026, 1, 1, i % 3, tzinfo=dt.timezone.utc),
          "packets": i} for i in range(60_000)], schema=FLOWS)
    print("ready", flush=True)
    while True:
        writer.write(table)
        writer.flush()
""")


def test_sigkill_mid_write_never_leaves_a_visible_half_file(tmp_path):
    """A writer process SIGKILLed at random moments, three times: every visible file is whole
    (readable, 60,000-row writes split in three partitions of 20,000), and the temporaries it
    left are removed by the next start's cleanup."""
    rng = random.Random(7)
    data = tmp_path / "data"
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(data)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        for path in visible(data):
            assert pq.read_metadata(path).num_rows == 20_000, path
        remove_stale_temporaries(data, "k")
        assert hidden(data) == []
    files = visible(data)
    assert files, "the writer never completed a file: kill later"
    con = duckdb.connect()
    count = con.execute(f"SELECT count(*) FROM '{data}/flows/**/*.parquet'").fetchone()[0]
    assert count == 20_000 * len(files)
