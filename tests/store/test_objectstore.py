"""The spool uploader and the AWS settings chain (collector/store/objectstore.py), against a real
S3-compatible store (SeaweedFS, tests/objectstore.py)."""

import datetime as dt
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from collector.store.objectstore import (StoreURL, StoreURLError, Uploader, aws_settings,
                                         s3_filesystem, spool_files)
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter

UTC = dt.timezone.utc


def write_files(spool, hours=(0, 1, 2), rows_per_hour=3, collector_id="c1", vni=1):
    writer = DatasetWriter(spool, "flows", collector_id=collector_id, writer_id="w0")
    writer.write(pa.Table.from_pylist(
        [{"vni": vni, "first_seen": dt.datetime(2026, 1, 1, h, 30, tzinfo=UTC), "packets": i + 1}
         for h in hours for i in range(rows_per_hour)], schema=FLOWS))
    return {p.relative_to(spool).as_posix(): p.read_bytes() for p in writer.flush()}


def uploader(spool, url, **options):
    options.setdefault("initial_backoff", 0.05)
    options.setdefault("max_backoff", 0.2)
    return Uploader(spool, url, filesystem=s3_filesystem(connect_timeout=1, request_timeout=5),
                    **options)


def test_completed_files_upload_to_the_same_keys_byte_for_byte_and_leave_the_spool(s3_store, tmp_path):
    written = write_files(tmp_path)
    (tmp_path / "flows" / "date=2026-01-01" / "hour=00" / ".c1-w0-1.parquet.tmp").write_bytes(b"half")
    up = uploader(tmp_path, s3_store.url)
    assert up.run_once()
    assert set(s3_store.objects()) == set(written)
    assert all(s3_store.read(key) == data for key, data in written.items())
    # only the writer's temporary (not yet a file of the dataset) stays
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [".c1-w0-1.parquet.tmp"]
    assert up.stats.files_uploaded == 3 and up.stats.bytes_uploaded == sum(map(len, written.values()))
    assert up.metrics()["spool_files"] == 0 and up.health_reasons() == []
    # and pyarrow reads the store as a Hive-partitioned dataset
    fs = s3_store.filesystem()
    table = ds.dataset(f"{s3_store.bucket}/{s3_store.prefix}/flows", filesystem=fs,
                       partitioning="hive").to_table()
    assert table.num_rows == 9


def test_upload_is_idempotent_a_crash_before_the_delete_never_duplicates(s3_store, tmp_path):
    written = write_files(tmp_path)
    keep = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, keep)
    assert uploader(tmp_path, s3_store.url).run_once()
    # the process died after the uploads, before deleting: the spool still holds every file
    shutil.rmtree(tmp_path)
    shutil.copytree(keep, tmp_path)
    assert uploader(tmp_path, s3_store.url).run_once()
    assert s3_store.objects() == {key: len(data) for key, data in written.items()}


def test_outage_files_queue_health_says_so_then_all_upload_once(s3_server_factory, tmp_path):
    server = s3_server_factory()
    url = "s3://collector-test/outage"
    spool = tmp_path / "spool"
    with pytest.MonkeyPatch.context() as env:
        for name, value in server.process_env().items():
            env.setenv(name, value)
        up = uploader(spool, url, unhealthy_after=0.5, max_files=4)
        first = write_files(spool, hours=(0,))
        assert up.run_once()
        server.stop(kill=True)  # the store crashes
        queued = write_files(spool, hours=(1, 2, 3, 4, 5))
        assert not up.run_once()
        assert up.stats.upload_failures >= 1 and up.stats.spool_files == 5
        assert up.stats.spool_bytes == sum(map(len, queued.values()))
        assert up.metrics()["store_reachable"] == 0
        assert {p.relative_to(spool).as_posix() for p in spool.rglob("*.parquet")} == set(queued)
        reasons = up.health_reasons(now=up.stats.unreachable_since + 1.0)
        assert any("unreachable" in r for r in reasons) and any("past the bound" in r for r in reasons)
        assert all(r.startswith("spool:") for r in reasons)
        assert server.secret_key not in " ".join(reasons) + str(up.stats.last_error)
        server.start()  # the store comes back: everything queued goes up, once
        assert up.run_once()
        assert up.health_reasons() == [] and up.metrics()["store_reachable"] == 1
        objects = server.objects("collector-test", "outage")
        assert objects == {f"outage/{key}": len(data) for key, data in {**first, **queued}.items()}
        assert spool_files(spool) == []


def test_a_restarted_uploader_uploads_what_the_spool_kept(s3_store, tmp_path):
    written = write_files(tmp_path, hours=(3, 4))
    # a previous run wrote these and stopped before uploading: a new uploader finds them
    up = uploader(tmp_path, s3_store.url).start()
    assert up.stop(timeout=10) == 0
    assert set(s3_store.objects()) == set(written)


def test_a_stop_with_the_store_down_leaves_the_files_in_the_spool(tmp_path, monkeypatch):
    # an endpoint where nothing listens: every upload fails at once
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    written = write_files(tmp_path)
    up = uploader(tmp_path, "s3://collector-test/x").start()
    assert up.stop(timeout=0.5) == 3
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")} == set(written)


def test_aws_settings_from_the_environment():
    settings = aws_settings({"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "hush",
                             "AWS_SESSION_TOKEN": "tok", "AWS_DEFAULT_REGION": "eu-west-3",
                             "AWS_ENDPOINT_URL": "http://minio.local:9000",
                             "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    assert (settings.access_key, settings.secret_key, settings.session_token) == ("AKIA", "hush", "tok")
    assert (settings.region, settings.endpoint, settings.scheme) == ("eu-west-3", "minio.local:9000", "http")
    assert "hush" not in repr(settings) and "AKIA" not in repr(settings)
    # the S3-specific endpoint wins; AWS_REGION over AWS_DEFAULT_REGION
    settings = aws_settings({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "https://b:2",
                             "AWS_REGION": "r1", "AWS_DEFAULT_REGION": "r2",
                             "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    assert (settings.endpoint, settings.scheme, settings.region) == ("b:2", "https", "r1")
    assert settings.access_key is None and settings.credentials_source == "the AWS SDK default chain"


def test_aws_settings_from_a_profile(tmp_path):
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = D\naws_secret_access_key = d\n"
                                          "[lab]\naws_access_key_id = L\naws_secret_access_key = l\n")
    (tmp_path / "config").write_text("[default]\nregion = us-west-2\n"
                                     "[profile lab]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:8333\n")
    files = {"AWS_CONFIG_FILE": str(tmp_path / "config"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    default = aws_settings(files)
    assert (default.access_key, default.region, default.endpoint) == ("D", "us-west-2", None)
    lab = aws_settings({**files, "AWS_PROFILE": "lab"})
    assert (lab.access_key, lab.secret_key, lab.region) == ("L", "l", "ap-south-1")
    assert (lab.endpoint, lab.scheme, lab.credentials_source) == ("127.0.0.1:8333", "http", "profile lab")


@pytest.mark.parametrize("text", ["s3://", "s3://A-Bucket/x", "s3://ab", "s3://bucket/a//b",
                                  "s3://bucket/../x", "file:///tmp", "/tmp/data"])
def test_bad_store_urls_are_refused_with_the_url(text):
    with pytest.raises(StoreURLError, match="s3://bucket/prefix|bucket name|prefix has"):
        StoreURL.parse(text)


def test_store_url_keys():
    url = StoreURL.parse("s3://my-bucket/a/b/")
    assert (url.bucket, url.prefix, str(url)) == ("my-bucket", "a/b", "s3://my-bucket/a/b")
    assert url.key("flows/date=2026-01-01/hour=00/x.parquet") == "my-bucket/a/b/flows/date=2026-01-01/hour=00/x.parquet"
    assert StoreURL.parse("s3://my-bucket").key("flows/x") == "my-bucket/flows/x"


def test_prune_removes_only_old_empty_partition_directories(tmp_path):
    import os

    from collector.store.objectstore import prune_spool

    write_files(tmp_path, hours=(0,))
    empty_old = tmp_path / "flows" / "date=2026-01-01" / "hour=05"
    empty_new = tmp_path / "flows" / "date=2026-01-01" / "hour=06"
    empty_old.mkdir()
    empty_new.mkdir()
    os.utime(empty_old, (1, 1))
    assert prune_spool(tmp_path, older_than=3600) == 1
    assert not empty_old.exists() and empty_new.exists()
    assert len(spool_files(tmp_path)) == 1  # a directory with a file stays, whatever its age
    os.utime(tmp_path / "flows" / "date=2026-01-01" / "hour=00", (1, 1))
    assert prune_spool(tmp_path, older_than=3600) == 0 and len(spool_files(tmp_path)) == 1


def test_an_unreadable_spool_file_neither_blocks_the_others_nor_reads_as_an_outage(s3_store, tmp_path):
    writer = DatasetWriter(tmp_path, "flows", collector_id="c1", writer_id="w0", max_rows=1)
    for i in range(70):  # 70 files: more than one batch of 64
        writer.write(pa.Table.from_pylist(
            [{"vni": 1, "first_seen": dt.datetime(2026, 1, 1, 0, i % 60, tzinfo=UTC), "packets": 1}],
            schema=FLOWS))
    writer.close()
    poison = tmp_path / "flows" / "date=2026-01-01" / "hour=00" / "0-poison.parquet"
    poison.mkdir()  # sorts first; reading it fails (a directory: even root cannot read it)
    up = uploader(tmp_path, s3_store.url)
    assert not up.run_once()
    assert len(s3_store.objects()) == 70 and spool_files(tmp_path) == [(poison.relative_to(tmp_path).as_posix(), poison.stat().st_size)]
    assert "0-poison.parquet: cannot read" in up.stats.last_error
    assert up.stats.unreachable_since is None and up.health_reasons() == [] and up.backoff() == up.interval


from hypothesis import given, strategies as st  # noqa: E402


@given(st.text(max_size=40).map(lambda t: "s3://" + t))
def test_any_store_url_parses_to_a_printable_round_trip_or_is_refused(text):
    try:
        url = StoreURL.parse(text)
    except StoreURLError as error:
        assert repr(text) in str(error)
        return
    assert StoreURL.parse(str(url)) == url
    assert url.key("flows/x.parquet") == f"{url.path}/flows/x.parquet"
    assert all(c.isprintable() for c in url.prefix) and "//" not in url.path


def test_probe_says_whether_the_bucket_answers(s3_store, tmp_path, monkeypatch):
    assert uploader(tmp_path, s3_store.url).probe() is None
    missing = uploader(tmp_path, "s3://no-such-bucket-here/x").probe()
    assert "'no-such-bucket-here' does not exist" in missing
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    down = uploader(tmp_path, s3_store.url).probe()
    assert down.startswith(f"{s3_store.url} cannot be reached: ")
    assert s3_store.server.secret_key not in missing + down
