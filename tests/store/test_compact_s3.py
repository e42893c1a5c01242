"""collector compact on an S3 prefix (a real SeaweedFS server on loopback): the same protocol
through pyarrow's S3 filesystem, read back through DuckDB's httpfs (collector.connect)."""

from __future__ import annotations

import threading
import time

import pyarrow.fs as pafs
import pytest

from collector.query import connect
from collector.store.compact import Settings, compact
from tests.store.compaction_data import START, Templates, results

NOW = START.timestamp() + 10 * 86400


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return Templates(tmp_path_factory.mktemp("templates"))


def upload(templates, tmp_path, store, **options):
    local = tmp_path / "local"
    templates.copy(local, **options)
    pafs.copy_files(str(local), f"{store.bucket}/{store.prefix}",
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store.filesystem())
    return local


def data_keys(store):
    return sorted(k for k in store.objects() if "/date=" in k and "/_manifests/" not in k)


def test_compaction_on_s3_keeps_every_answer_and_leaves_one_object_per_hour(templates, tmp_path, s3_store):
    local = upload(templates, tmp_path, s3_store, hours=2, files_per_hour=6)
    expected = results(connect(local))
    assert results(connect(s3_store.url)) == expected
    compact(s3_store.url, settings=Settings(grace=0), now=NOW)
    assert results(connect(s3_store.url)) == expected
    keys = data_keys(s3_store)
    assert len(keys) == 4 and all("/compact~" in k for k in keys), keys  # flows + packets, 2 h
    again = compact(s3_store.url, settings=Settings(grace=0), now=NOW + 1)
    assert again.compacted == [] and data_keys(s3_store) == keys


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["wrote", "committed", "published", "deleted"])
def test_a_crash_on_s3_loses_and_doubles_nothing(templates, tmp_path, s3_store, step):
    local = upload(templates, tmp_path, s3_store, hours=1, files_per_hour=6)
    expected = results(connect(local))

    def hook(name, detail):
        if name == step:
            raise Crash(name)

    with pytest.raises(Crash):
        compact(s3_store.url, tables=["flows"], settings=Settings(grace=0), now=NOW, hook=hook)
    con = connect(s3_store.url)
    assert results(con) == expected
    compact(s3_store.url, tables=["flows"], settings=Settings(grace=0), now=NOW + 1)
    assert results(con) == expected
    assert all("/compact~" in k for k in data_keys(s3_store) if "/flows/" in k)


def test_queries_on_s3_during_compaction_see_the_same_rows(templates, tmp_path, s3_store):
    local = upload(templates, tmp_path, s3_store, hours=3, files_per_hour=6)
    expected = results(connect(local))
    stop, seen, errors = threading.Event(), [], []

    def reader():
        con = connect(s3_store.url)
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
        for _ in range(3):  # commit, then publish + delete after the grace, then nothing
            compact(s3_store.url, settings=Settings(grace=0.5), hook=lambda s, d: time.sleep(0.01))
            time.sleep(0.6)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) >= 2 and not any(seen), f"results differed: {seen}"
    assert all("/compact~" in k for k in data_keys(s3_store))


def test_the_cli_compacts_an_s3_prefix(templates, tmp_path, s3_store):
    from click.testing import CliRunner

    from collector.cli import main

    local = upload(templates, tmp_path, s3_store, hours=1, files_per_hour=6)
    expected = results(connect(local))
    result = CliRunner().invoke(main, ["compact", "--data", s3_store.url, "--table", "flows",
                                       "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert "flows/date=2026-01-01/hour=00: merged 6 files, 240 rows into 1" in result.output
    assert results(connect(s3_store.url)) == expected


def test_a_manifest_gone_between_listing_and_reading_is_a_file_not_found(s3_store):
    """What `latest_manifests` retries on: an old generation deleted under a reader."""
    from collector.store.manifest import ManifestCache, location_of

    location = location_of(s3_store.url)
    with pytest.raises(FileNotFoundError):
        ManifestCache().read(location, location.join("flows", "_manifests", "date=2026-01-01",
                                                     "hour=00", "0000000001.json"))
