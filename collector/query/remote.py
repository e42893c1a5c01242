"""SQL over a dataset in an object store: `connect("s3://bucket/prefix")`.

The views are the local ones (collector/query/__init__.py): the same SQL over the same layout.
What differs is how files are found and read:

- the file list: pyarrow's S3 filesystem configured by the AWS chain
  (collector/store/objectstore.py), through the manifest-aware `live_files` of
  collector/store/manifest.py, so a compaction running on the prefix never shows a row twice;
  it is made when a query binds, so files uploaded after `connect` are seen;
- the reading: DuckDB's httpfs extension, loaded from the `duckdb-extension-httpfs` wheel
  (pinned with duckdb: never downloaded at run time), with an in-memory S3 secret built from
  the same AWS chain: static keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
  AWS_SESSION_TOKEN or the profile's credentials file, AWS_REGION, and for an S3-compatible
  endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) path-style URLs, TLS per its scheme.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

__all__ = ["connect", "httpfs_extension_path", "s3_secret_sql"]


def httpfs_extension_path() -> Path | None:
    """The httpfs extension file shipped by the wheel for this DuckDB version, if installed."""
    from collector.query import wheel_extension_path

    return wheel_extension_path("duckdb_extension_httpfs", "httpfs")


def s3_secret_sql(settings, name: str = "collector_s3") -> str:
    """CREATE SECRET for DuckDB from `AWSSettings` (objectstore.aws_settings). Holds the
    credentials: execute it, never log it."""
    options = ["TYPE s3"]

    def add(key: str, value) -> None:
        if value:
            options.append(f"{key} '{_quote(str(value))}'")

    add("KEY_ID", settings.access_key)
    add("SECRET", settings.secret_key)
    add("SESSION_TOKEN", settings.session_token)
    add("REGION", settings.region)
    if settings.endpoint:
        add("ENDPOINT", settings.endpoint)
        options.append("URL_STYLE 'path'")
        options.append(f"USE_SSL {'true' if settings.scheme == 'https' else 'false'}")
    return f"CREATE OR REPLACE SECRET {name} ({', '.join(options)})"


def prepare(con: duckdb.DuckDBPyConnection, env: dict | None = None) -> None:
    """Load httpfs into `con` and give it the S3 secret of the AWS chain."""
    from collector.query import QueryError
    from collector.store.objectstore import aws_settings

    extension = httpfs_extension_path()
    if extension is None:
        raise QueryError("s3:// needs the httpfs extension of the duckdb-extension-httpfs wheel "
                         f"(== duckdb {duckdb.__version__}): pip install "
                         f"duckdb-extension-httpfs=={duckdb.__version__}")
    con.execute(f"LOAD '{_quote(str(extension))}'")
    try:
        con.execute(s3_secret_sql(aws_settings(env)))
    except duckdb.Error:
        # DuckDB's message could quote the statement, and so the credentials: not shown
        raise QueryError("DuckDB refused the S3 settings of the AWS environment "
                         "(AWS_REGION, AWS_ENDPOINT_URL_S3, credentials)") from None


def connect(url: str, *, database: str = ":memory:", env: dict | None = None,
            sandbox: bool = True, settings: dict | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over the dataset at `url` (s3://bucket/prefix), with the views of
    a local dataset; confined to the prefix (`collector.query.lock`) unless not `sandbox`."""
    from collector.query import open_views
    from collector.store.manifest import Location
    from collector.store.objectstore import StoreURL, s3_filesystem

    store = StoreURL.parse(url)
    con = duckdb.connect(database)
    prepare(con, env)
    location = Location(s3_filesystem(env), store.path, "s3://")
    return open_views(con, location, str(store) + "/", sandbox=sandbox, settings=settings)


def _quote(text: str) -> str:
    return text.replace("'", "''")
