"""Queries over a dataset in a real S3-compatible store (SeaweedFS) equal those over the same
files on local disk (collector/query/remote.py)."""

import datetime as dt
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from collector.query import connect
from collector.query.remote import httpfs_extension_path, s3_secret_sql
from collector.store.objectstore import AWSSettings, Uploader, s3_filesystem
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter
from tests.objectstore import S3Store

UTC = dt.timezone.utc
QUERIES = [
    "SELECT count(*), sum(packets), sum(bytes) FROM flows",
    "SELECT src_addr, dst_addr, sum(bytes + rev_bytes) AS b FROM flows GROUP BY ALL ORDER BY b DESC, 1, 2",
    "SELECT date, hour, collector_id, count(*) FROM flows GROUP BY ALL ORDER BY ALL",
    "SELECT src_addr, dst_addr, src_port, dst_port, packets, rev_packets, segments, collectors "
    "FROM conversations ORDER BY ALL",
    'SELECT srcaddr, dstaddr, packets, "start" FROM vpc_flow_logs ORDER BY ALL',
    "SELECT count(*) FROM flows WHERE in_cidr(src_addr, '10.0.0.0/24')",
    "SELECT count(*) FROM packets",
]


def flows(collector_id, seed):
    """Both directions of some conversations, metered by two collectors."""
    rows = []
    for i in range(40):
        forward = (i + seed) % 2 == 0
        a, b = f"10.0.0.{i % 7}", f"10.0.1.{i % 5}"
        rows.append({"vni": 9, "collector_id": collector_id, "ip_version": 4, "protocol": 6,
                     "src_addr": a if forward else b, "dst_addr": b if forward else a,
                     "src_port": 40000 + i % 3 if forward else 443,
                     "dst_port": 443 if forward else 40000 + i % 3,
                     # the second collector saw each conversation a second later: one initiator
                     "first_seen": dt.datetime(2026, 3, 1, i % 3, i, seed, tzinfo=UTC),
                     "last_seen": dt.datetime(2026, 3, 1, i % 3, i, 30, tzinfo=UTC),
                     "packets": i + 1, "bytes": 100 * (i + 1), "rev_packets": i % 4,
                     "rev_bytes": 60 * (i % 4), "tcp_flags": 2, "rev_tcp_flags": 18,
                     "truncated_packets": 0, "rev_truncated_packets": 0})
    return pa.Table.from_pylist(rows, schema=FLOWS)


@pytest.fixture(scope="module")
def shared_dataset(s3_server, tmp_path_factory):
    """The same files in a local directory and under a prefix of the store (made once)."""
    tmp_path = tmp_path_factory.mktemp("remote")
    store = S3Store(s3_server)
    local, spool = tmp_path / "local", tmp_path / "spool"
    for root in (local, spool):
        for collector_id, seed in (("a1", 0), ("b2", 1)):
            writer = DatasetWriter(root, "flows", collector_id=collector_id, writer_id="w0")
            writer.write(flows(collector_id, seed))
            writer.close()
    assert Uploader(spool, store.url, filesystem=s3_server.filesystem()).run_once()
    return local, store


@pytest.fixture
def dataset(shared_dataset, s3_store):
    """`shared_dataset`, with the store's AWS variables in os.environ (s3_store sets them)."""
    return shared_dataset


def test_httpfs_comes_from_the_wheel():
    assert httpfs_extension_path() is not None


@pytest.mark.parametrize("sql", QUERIES)
def test_queries_over_s3_equal_queries_over_local_disk(dataset, sql):
    local, store = dataset
    expected = connect(local).sql(sql).fetchall()
    assert expected and connect(store.url).sql(sql).fetchall() == expected


def test_files_uploaded_after_connect_are_seen_and_an_empty_prefix_binds(s3_store, tmp_path):
    con = connect(s3_store.url)
    assert con.sql("SELECT count(*) FROM flows").fetchall() == [(0,)]
    writer = DatasetWriter(tmp_path, "flows", collector_id="late", writer_id="w0")
    writer.write(flows("late", 0))
    writer.close()
    Uploader(tmp_path, s3_store.url, filesystem=s3_filesystem()).run_once()
    assert connect(s3_store.url).sql("SELECT count(*) FROM flows").fetchall() == [(40,)]


def test_cli_query_over_s3(dataset):
    local, store = dataset
    sql = "SELECT collector_id, sum(packets) AS p FROM flows GROUP BY 1 ORDER BY 1"
    run = subprocess.run([sys.executable, "-m", "collector", "query", "--data", store.url,
                          "--format", "json", sql], capture_output=True, text=True,
                         env=store.process_env(), timeout=60)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()] if not run.stdout.startswith("[") \
        else json.loads(run.stdout)
    expected = connect(local).sql(sql).fetchall()
    assert [(r["collector_id"], int(r["p"])) for r in rows] == expected  # sums: JSON strings


def test_secret_sql_for_an_s3_compatible_endpoint_and_for_aws():
    sql = s3_secret_sql(AWSSettings("AK", "S'x", None, "eu-west-1", "127.0.0.1:8333", "http"))
    assert "ENDPOINT '127.0.0.1:8333'" in sql and "URL_STYLE 'path'" in sql
    assert "USE_SSL false" in sql and "SECRET 'S''x'" in sql and "REGION 'eu-west-1'" in sql
    aws = s3_secret_sql(AWSSettings("AK", "S", "T", "us-east-2"))
    assert "ENDPOINT" not in aws and "URL_STYLE" not in aws and "SESSION_TOKEN 'T'" in aws


def test_an_s3_connection_is_confined_to_its_prefix(dataset):
    import duckdb

    from collector import query

    if not hasattr(query, "lock"):
        pytest.skip("this version has no query sandbox")
    local, store = dataset
    con = connect(store.url)
    assert con.sql("SELECT count(*) FROM flows").fetchall() == [(80,)]
    other = f"s3://{store.bucket}/elsewhere/flows/x.parquet"
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT * FROM read_parquet('{other}')"):
        with pytest.raises(duckdb.PermissionException):
            con.sql(sql).fetchall()
