"""`collector query` runs SQL that may come from someone else: after the views are made, the
DuckDB connection reads the dataset and nothing else (collector.query.lock). Each escape
below is a real DuckDB feature that would otherwise read or write any file the querying user
can, or load code."""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector.query import connect, lock
from collector.store.schema import TABLES

SECRET_FILE_TEXT = "root:x:0:0:not-for-sql"


@pytest.fixture()
def dataset(tmp_path):
    """A dataset with one flows file, a secret file beside it, and its path given relative."""
    data = tmp_path / "data"
    part = data / "flows" / "date=2026-01-01" / "hour=0"
    part.mkdir(parents=True)
    schema = TABLES["flows"]
    pq.write_table(pa.Table.from_pylist([], schema=schema), part / "empty.parquet")
    (tmp_path / "secret.csv").write_text(SECRET_FILE_TEXT + "\n")
    (tmp_path / "data-other").mkdir()
    (tmp_path / "data-other" / "x.csv").write_text("a\n1\n")
    return tmp_path


ESCAPES = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/proc/self/environ')",
    "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT * FROM read_csv('secret.csv')",
    "SELECT * FROM read_csv('data/../secret.csv')",
    "SELECT * FROM read_csv('{tmp}/data/../secret.csv')",
    "SELECT * FROM read_csv('data-other/x.csv')",  # a sibling sharing the prefix "data"
    "SELECT * FROM glob('/etc/*')",
    "COPY (SELECT 1) TO '{tmp}/out.csv'",
    "COPY (SELECT 1) TO '/tmp/collector-sandbox-escape.csv'",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "EXPORT DATABASE '{tmp}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{tmp}/evil.duckdb_extension'",
    "SELECT * FROM 'https://example.invalid/x.csv'",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "SET allow_unsigned_extensions = true",
    "SET temp_directory = '/tmp/elsewhere'",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_escapes_are_refused(dataset, monkeypatch, sql):
    monkeypatch.chdir(dataset)
    con = connect("data")
    with pytest.raises(duckdb.Error) as info:
        con.execute(sql.format(tmp=dataset)).fetchall()
    assert isinstance(info.value, (duckdb.PermissionException, duckdb.InvalidInputException)), info.value
    assert not (dataset / "out.csv").exists() and not (dataset / "export").exists()
    assert not os.path.exists("/tmp/collector-sandbox-escape.csv")


def test_the_dataset_stays_queryable(dataset, monkeypatch):
    monkeypatch.chdir(dataset)
    for root in ("data", dataset / "data"):
        con = connect(root)
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM conversations").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM vpc_flow_logs").fetchone() == (0,)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
        assert con.execute("SELECT current_setting('lock_configuration')").fetchone() == (True,)
    # inet stays loaded (it was loaded before the lock)
    assert connect(dataset / "data").execute("SELECT in_cidr('10.0.0.1', '10.0.0.0/8')").fetchone() == (True,)


def test_empty_dataset_is_queryable_locked(tmp_path):
    con = connect(tmp_path / "absent")
    assert con.execute("SELECT count(*) FROM packets").fetchone() == (0,)
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")


def test_python_api_may_opt_out(dataset):
    con = connect(dataset / "data", sandbox=False)
    assert con.execute(f"SELECT * FROM read_csv('{dataset}/secret.csv', header=false, sep='|')").fetchone() == (SECRET_FILE_TEXT,)


def test_lock_allows_an_s3_prefix_only():
    """For a dataset in S3: httpfs loaded and the secret made before the lock, the prefix is
    reached (here a closed local endpoint: a connection error, not a permission one), any other
    bucket or prefix and every local file refused."""
    from collector.query.remote import httpfs_extension_path

    extension = httpfs_extension_path()
    if extension is None:
        pytest.skip("no duckdb-extension-httpfs wheel")
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    con.execute("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's', REGION 'us-east-1', "
                "ENDPOINT '127.0.0.1:9', URL_STYLE 'path', USE_SSL false)")
    lock(con, "s3://bucket/prefix")
    with pytest.raises(duckdb.IOException):
        con.execute("SELECT * FROM read_parquet('s3://bucket/prefix/flows/x.parquet')")
    for outside in ("s3://bucket/other/x.parquet", "s3://bucket/prefix-other/x.parquet", "/etc/passwd"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"SELECT * FROM read_parquet('{outside}')")


def test_collector_query_command_refuses_reading_files(dataset):
    """The CLI as an operator (or a tool passing SQL on) runs it: refused, exit status not 0,
    and the file's text nowhere in the output."""
    proc = subprocess.run([sys.executable, "-m", "collector", "query", "--data", "data",
                           f"SELECT * FROM read_csv('{dataset}/secret.csv')"],
                          cwd=dataset, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert SECRET_FILE_TEXT not in proc.stdout + proc.stderr
    assert "Permission" in proc.stderr or "disabled" in proc.stderr, proc.stderr


def test_settings_are_applied_before_the_lock(dataset):
    con = connect(dataset / "data", settings={"TimeZone": "UTC", "threads": 1})
    assert con.execute("SELECT current_setting('TimeZone'), current_setting('threads')").fetchone() == ("UTC", 1)
    with pytest.raises(duckdb.Error):
        con.execute("SET TimeZone = 'Europe/Paris'")


def test_a_setting_name_must_be_a_name(dataset):
    from collector.query import QueryError

    with pytest.raises(QueryError, match="setting name"):
        connect(dataset / "data", settings={"threads = 1; ATTACH 'x'; SET x": 1})
