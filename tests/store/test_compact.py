"""collector compact: merged files, the same answers before, during and after, and after a crash
at any step of its commit."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.query import connect
from collector.store.compact import CompactError, Settings, compact, hour_is_closed
from collector.store.manifest import live_files, read_manifest
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter
from tests.store.compaction_data import START, Templates, flow_rows, results, write_small_files

PROJECT = Path(__file__).resolve().parents[2]
NOW = START.timestamp() + 10 * 86400  # well after the dataset's hours: all closed


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return Templates(tmp_path_factory.mktemp("templates"))


def data_files(root, table="flows"):
    return sorted(p.relative_to(root / table).as_posix()
                  for p in (root / table).glob("date=*/hour=*/*") if not p.name.startswith("."))


def test_closed_hours_become_one_sorted_zstd_file_and_answers_stay(templates, tmp_path):
    templates.copy(tmp_path, hours=3, files_per_hour=6)
    before = results(connect(tmp_path))
    assert len(data_files(tmp_path)) == 18
    result = compact(tmp_path, settings=Settings(grace=0), now=NOW)
    assert [(p.table, p.action, p.files_in, p.files_out) for p in result.compacted] == (
        [("flows", "compacted", 6, 1)] * 3 + [("packets", "compacted", 6, 1)] * 3)
    assert results(connect(tmp_path)) == before
    files = data_files(tmp_path)
    assert len(files) == 3 and all("/compact~" in f for f in files)
    meta = pq.ParquetFile(tmp_path / "flows" / files[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.metadata[b"collector.schema_version"] == b"1"
    first_seen = pq.read_table(tmp_path / "flows" / files[0])["first_seen"].to_pylist()
    assert first_seen == sorted(first_seen)
    # hidden names, manifests and temporaries are gone or hidden from Hive engines
    assert not list(tmp_path.glob("flows/date=*/hour=*/_*")) and not list(tmp_path.glob("flows/date=*/hour=*/.*"))


def test_a_second_run_changes_nothing(templates, tmp_path):
    templates.copy(tmp_path, hours=2)
    compact(tmp_path, settings=Settings(grace=0), now=NOW)
    files, manifests = data_files(tmp_path), sorted(tmp_path.glob("flows/_manifests/*/*/*"))
    before = results(connect(tmp_path))
    again = compact(tmp_path, settings=Settings(grace=0), now=NOW + 1)
    assert again.compacted == [] and sum(p.published + p.deleted for p in again.partitions) == 0
    assert data_files(tmp_path) == files and sorted(tmp_path.glob("flows/_manifests/*/*/*")) == manifests
    assert results(connect(tmp_path)) == before


def test_open_hours_are_left_alone(templates, tmp_path):
    templates.copy(tmp_path, hours=3)
    # at 02:30 with --older-than 1 h: hour 00 (ended 01:00) is closed, 01 (ended 02:00) not yet
    now = START.timestamp() + 2.5 * 3600
    assert hour_is_closed("date=2026-01-01/hour=00", now, 3600)
    assert not hour_is_closed("date=2026-01-01/hour=02", now, 3600)
    result = compact(tmp_path, tables=["flows"], settings=Settings(older_than=3600, grace=0), now=now)
    assert {p.partition: p.action for p in result.partitions} == {
        "date=2026-01-01/hour=00": "compacted", "date=2026-01-01/hour=01": "open",
        "date=2026-01-01/hour=02": "open"}


def test_target_rows_splits_and_stragglers_join_the_partial_file(templates, tmp_path):
    write_small_files(tmp_path, hours=1, files_per_hour=6, rows_per_file=40)  # 240 rows
    compact(tmp_path, tables=["flows"], settings=Settings(grace=0, target_rows=100), now=NOW)
    _, manifest = read_manifest(_location(tmp_path), "flows", "date=2026-01-01/hour=00")
    assert sorted(e["rows"] for e in manifest.live.values()) == [40, 100, 100]
    # a straggler comes: it merges with the partial file only, the full ones stay
    _straggler(tmp_path, 30)
    before = results(connect(tmp_path))
    compact(tmp_path, tables=["flows"], settings=Settings(grace=0, target_rows=100), now=NOW + 1)
    _, manifest = read_manifest(_location(tmp_path), "flows", "date=2026-01-01/hour=00")
    assert sorted(e["rows"] for e in manifest.live.values()) == [70, 100, 100]
    assert results(connect(tmp_path)) == before


def _location(root):
    from collector.store.manifest import location_of
    return location_of(root)


def _straggler(root, rows, collector="late", hour=0):
    import random
    writer = DatasetWriter(root, "flows", collector_id=collector)
    writer.write(pa.Table.from_pylist(flow_rows(rows, hour, random.Random(rows), collector), schema=FLOWS))
    return writer.flush()


def test_a_file_written_after_planning_is_kept_and_merged_next_time(templates, tmp_path):
    templates.copy(tmp_path, hours=1)
    added = []

    def hook(step, detail):
        if step == "planned" and not added:  # a straggler into the closed hour, mid-run
            added.extend(_straggler(tmp_path, 25))

    compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW, hook=hook)
    con = connect(tmp_path)
    assert added[0].exists()
    assert con.sql("SELECT count(*) FROM flows WHERE collector_id = 'late'").fetchone() == (25,)
    before = results(con)
    second = compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW + 1)
    assert [p.files_in for p in second.compacted] == [2] and not added[0].exists()
    assert results(connect(tmp_path)) == before


def test_a_schema_of_an_older_version_is_conformed(templates, tmp_path):
    """A file lacking a newer column (union by name) merges with NULLs there."""
    write_small_files(tmp_path, hours=1, collectors=("a",))
    old = pa.Table.from_pylist(flow_rows(5, 0, __import__("random").Random(9), "old"), schema=FLOWS)
    old = old.drop_columns(["community_id", "inner_vlan_id"])
    pq.write_table(old, tmp_path / "flows/date=2026-01-01/hour=00/old-0-1.parquet")
    before = results(connect(tmp_path))
    compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW)
    assert results(connect(tmp_path)) == before and len(data_files(tmp_path)) == 1


def test_dry_run_changes_nothing(templates, tmp_path):
    templates.copy(tmp_path, hours=2)
    files = data_files(tmp_path)
    result = CliRunner().invoke(main, ["compact", "--data", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "flows/date=2026-01-01/hour=00: would merge 6 files, 240 rows" in result.output
    assert data_files(tmp_path) == files and not (tmp_path / "flows" / "_manifests").exists()


def test_cli_compacts_and_reports(templates, tmp_path):
    templates.copy(tmp_path, hours=1)
    before = results(connect(tmp_path))
    result = CliRunner().invoke(main, ["compact", "--data", str(tmp_path), "--table", "flows",
                                       "--grace", "0", "--target-rows", "1000"])
    assert result.exit_code == 0, result.output
    assert "flows/date=2026-01-01/hour=00: merged 6 files, 240 rows into 1" in result.output
    assert results(connect(tmp_path)) == before


def test_two_runs_at_once_are_refused(templates, tmp_path):
    templates.copy(tmp_path, hours=1)
    started, release = threading.Event(), threading.Event()

    def hook(step, detail):
        started.set()
        release.wait(10)

    first = threading.Thread(target=compact, args=(tmp_path,),
                             kwargs=dict(settings=Settings(grace=0), now=NOW, hook=hook))
    first.start()
    try:
        assert started.wait(10)
        with pytest.raises(CompactError, match="another"):
            compact(tmp_path, settings=Settings(grace=0), now=NOW)
    finally:
        release.set()
        first.join()


# -- a reader during compaction ----------------------------------------------------------------

def test_queries_during_repeated_compaction_always_see_the_same_rows(templates, tmp_path):
    templates.copy(tmp_path, hours=6, files_per_hour=6)
    expected = results(connect(tmp_path))
    stop, seen, errors = threading.Event(), [], []

    def reader():
        con = connect(tmp_path)
        while not stop.is_set():
            try:
                got = results(con)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(repr(err))
                return
            seen.append(sorted(name for name in got if got[name] != expected[name]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # commits, publications and deletions spread over time (grace 0.3 s), each step slowed
        # a little so that the reader's listings land between them
        slow = lambda step, detail: time.sleep(0.01)  # noqa: E731
        for round_ in range(4):
            if round_ == 2:  # later rounds have new small files to merge again
                stop.set()
                thread.join()
                write_small_files(tmp_path, hours=6, files_per_hour=2, seed=7)
                expected.update(results(connect(tmp_path)))
                stop.clear()
                thread = threading.Thread(target=reader)
                thread.start()
            compact(tmp_path, settings=Settings(grace=0.3, target_rows=150), hook=slow)
            time.sleep(0.35)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) >= 4 and not any(seen), f"results differed: {seen}"
    assert all("compact~" in f for f in data_files(tmp_path))  # compacted, published or not


# -- crash safety ------------------------------------------------------------------------------

class Crash(Exception):
    pass


STEPS = [("planned", 1), ("wrote", 1), ("wrote", 2), ("committed", 1), ("published", 1),
         ("published", 2), ("deleted", 1), ("deleted", 4), ("unhidden", 1), ("maintained", 1),
         ("committed", 2)]


@pytest.mark.parametrize("step,occurrence", STEPS)
def test_a_crash_at_any_step_loses_and_doubles_nothing(templates, tmp_path, step, occurrence):
    templates.copy(tmp_path, hours=2, files_per_hour=6)
    con = connect(tmp_path)  # one connection: its views list the files again at every query
    expected = results(con)
    calls = {}

    def hook(name, detail):
        calls[name] = calls.get(name, 0) + 1
        if name == step and calls[name] == occurrence:
            raise Crash(f"{name} #{occurrence}")

    with pytest.raises(Crash):
        compact(tmp_path, settings=Settings(grace=0, target_rows=100), now=NOW, hook=hook)
    assert results(con) == expected
    compact(tmp_path, settings=Settings(grace=0, target_rows=100), now=NOW + 1)  # the next run
    assert results(con) == expected
    compact(tmp_path, settings=Settings(grace=0, target_rows=100), now=NOW + 2)
    assert results(con) == expected
    names = [Path(f).name for f in data_files(tmp_path)]
    assert names and all(n.startswith("compact~") for n in names), names


def test_kill_9_during_a_commit_and_the_next_run_finishes(templates, tmp_path):
    templates.copy(tmp_path, hours=2, files_per_hour=6)
    expected = results(connect(tmp_path))
    marker = tmp_path / "stopped-at"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from collector.store.compact import Settings, compact

        def hook(step, detail):
            if step == "committed":  # the first partition committed, its files not yet moved
                Path({str(marker)!r}).write_text(step)
                time.sleep(60)

        compact({str(tmp_path)!r}, settings=Settings(grace=0), now={NOW}, hook=hook)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert results(connect(tmp_path)) == expected
    # a random kill of the real command, mid-run, changes nothing either
    cli = subprocess.Popen([sys.executable, "-m", "collector", "compact", "--data", str(tmp_path),
                            "--grace", "0"], cwd=PROJECT)
    time.sleep(0.8)
    if cli.poll() is None:
        os.kill(cli.pid, signal.SIGKILL)
    cli.wait(10)
    assert results(connect(tmp_path)) == expected
    compact(tmp_path, settings=Settings(grace=0), now=NOW + 1)
    assert results(connect(tmp_path)) == expected
    assert all("/compact~" in f for f in data_files(tmp_path)), data_files(tmp_path)


def test_live_files_names_each_compacted_file_once(templates, tmp_path):
    """Between commit and the end of the grace a compacted file has two names: one is read."""
    templates.copy(tmp_path, hours=1)
    compact(tmp_path, tables=["flows"], settings=Settings(grace=100), now=NOW)
    compact(tmp_path, tables=["flows"], settings=Settings(grace=100), now=NOW + 150)  # published
    names = sorted(p.name for p in (tmp_path / "flows/date=2026-01-01/hour=00").iterdir())
    assert len([n for n in names if n.startswith("compact~")]) == 1
    assert len([n for n in names if n.startswith("_compact~")]) == 1
    assert [Path(f).name for f in live_files(tmp_path, "flows")] == [
        n for n in names if n.startswith("compact~")]


def test_a_corrupt_manifest_is_an_error_naming_it(templates, tmp_path):
    templates.copy(tmp_path, hours=1)
    compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW)
    [manifest] = tmp_path.glob("flows/_manifests/*/*/*.json")
    manifest.write_text("{not json")
    with pytest.raises(Exception, match=r"0000000002\.json: unreadable manifest"):
        connect(tmp_path).sql("SELECT count(*) FROM flows").fetchall()
    with pytest.raises(Exception, match="unreadable manifest"):
        compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW + 1)


def test_a_reader_keeps_only_the_latest_manifests(templates, tmp_path):
    from collector.store.manifest import ManifestCache

    templates.copy(tmp_path, hours=2)
    cache = ManifestCache()
    for step in range(3):  # commit, then publish + delete: new generations each time
        compact(tmp_path, settings=Settings(grace=10), now=NOW + 20 * step)
        assert len(live_files(tmp_path, "flows", cache)) == 2
        assert len(live_files(tmp_path, "packets", cache)) == 2
        assert len(cache._parsed) == 4  # one per partition of each table


def test_writers_still_writing_lose_nothing_and_double_nothing(templates, tmp_path):
    """A writer keeps adding files to an open hour and stragglers to closed ones while
    compaction runs again and again: at the end every row written is there exactly once."""
    import random

    templates.copy(tmp_path, hours=3)
    expected_rows = connect(tmp_path).sql("SELECT count(*) FROM flows").fetchone()[0]
    now = START.timestamp() + 3.2 * 3600  # with --older-than 0: hours 00-02 closed, 03 open
    stop, written = threading.Event(), [0]

    def writer():
        rng = random.Random(5)
        out = DatasetWriter(tmp_path, "flows", collector_id="live", writer_id="9")
        while not stop.is_set():
            rows = flow_rows(7, rng.choice([0, 1, 3]), rng, "live")
            out.write(pa.Table.from_pylist(rows, schema=FLOWS))
            out.flush()
            written[0] += len(rows)
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for step in range(4):
            compact(tmp_path, tables=["flows"], settings=Settings(older_than=0, grace=0),
                    now=now + step)
    finally:
        stop.set()
        thread.join()
    con = connect(tmp_path)
    assert con.sql("SELECT count(*) FROM flows").fetchone() == (expected_rows + written[0],)
    assert con.sql("SELECT count(*) FROM flows WHERE collector_id = 'live'").fetchone() == (written[0],)
    # the open hour was never touched; closed hours hold compacted files (and new stragglers)
    assert not list(tmp_path.glob("flows/date=2026-01-01/hour=03/*compact~*"))
    assert list(tmp_path.glob("flows/date=2026-01-01/hour=00/compact~*"))


def test_an_unreachable_store_is_one_line_not_a_traceback(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    result = CliRunner().invoke(main, ["compact", "--data", "s3://bucket-x/prefix"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: s3://bucket-x/prefix: ") and "later run" in result.output


def test_without_hard_links_publication_copies(templates, tmp_path, monkeypatch):
    templates.copy(tmp_path, hours=1)
    before = results(connect(tmp_path))

    def no_links(source, target):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    compact(tmp_path, tables=["flows"], settings=Settings(grace=0), now=NOW)
    assert [Path(f).name.startswith("compact~") for f in data_files(tmp_path)] == [True]
    assert results(connect(tmp_path)) == before
