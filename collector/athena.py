"""Athena / AWS Glue table definitions for a collector dataset in S3.

`athena_ddl(location)` gives one `CREATE EXTERNAL TABLE` per table (flows, packets, sessions),
its columns mapped from the pyarrow schemas of collector/store/schema.py, partitioned by
`date` (string, yyyy-MM-dd) and `hour` (int, two digits in the path, as the writer names the
directories), with partition projection, so Athena computes the partition locations from the
query's predicates: no crawler, no `MSCK REPAIR TABLE`, and a new hour is queryable as soon as
its first file lands.

Athena (like Spark and Hive) skips files whose names start with '_' or '.': the collector's
temporaries, manifests (`_manifests/`) and not-yet-published compacted files
(`_compact~*.parquet`) are never read as data (docs/scale-out.md).
"""

from __future__ import annotations

import re

import pyarrow as pa

from collector.store.schema import TABLES

_SCALARS = {
    pa.int8(): "tinyint", pa.int16(): "smallint", pa.int32(): "int", pa.int64(): "bigint",
    pa.float32(): "float", pa.float64(): "double", pa.bool_(): "boolean", pa.string(): "string",
    pa.large_string(): "string", pa.binary(): "binary", pa.large_binary(): "binary",
    pa.date32(): "date",
}
_LOCATION = re.compile(r"^s3a?://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$|^s3://BUCKET/PREFIX$")


def athena_type(type_: pa.DataType) -> str:
    """The Athena (Hive DDL) type of a pyarrow type; ValueError for one it cannot hold."""
    if type_ in _SCALARS:
        return _SCALARS[type_]
    if pa.types.is_timestamp(type_):
        # Parquet INT64 timestamps (microseconds, UTC-adjusted): Athena's timestamp, in UTC
        return "timestamp"
    if pa.types.is_map(type_):
        return f"map<{athena_type(type_.key_type)},{athena_type(type_.item_type)}>"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"array<{athena_type(type_.value_type)}>"
    if pa.types.is_struct(type_):
        return "struct<" + ",".join(f"{f.name}:{athena_type(f.type)}" for f in type_) + ">"
    if pa.types.is_decimal(type_):
        return f"decimal({type_.precision},{type_.scale})"
    raise ValueError(f"no Athena type for {type_}")


def _string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table_ddl(table: str, location: str, *, database: str = "collector", table_prefix: str = "",
              start_date: str = "2026-01-01") -> str:
    """The CREATE EXTERNAL TABLE statement of one table."""
    schema = TABLES[table]
    root = location.rstrip("/") + f"/{table}"
    name = f"`{database}`.`{table_prefix}{table}`"
    columns = []
    for field in schema:
        doc = (field.metadata or {}).get(b"doc")
        comment = f" COMMENT {_string(doc.decode())}" if doc else ""
        columns.append(f"  `{field.name}` {athena_type(field.type)}{comment}")
    properties = [
        ("projection.enabled", "true"),
        ("projection.date.type", "date"),
        ("projection.date.format", "yyyy-MM-dd"),
        ("projection.date.range", f"{start_date},NOW"),
        ("projection.date.interval", "1"),
        ("projection.date.interval.unit", "DAYS"),
        ("projection.hour.type", "integer"),
        ("projection.hour.range", "0,23"),
        ("projection.hour.digits", "2"),
        ("storage.location.template", f"{root}/date=${{date}}/hour=${{hour}}/"),
        ("parquet.compression", "ZSTD"),
        ("collector.schema_version", (schema.metadata or {}).get(b"collector.schema_version", b"").decode()),
    ]
    return (f"CREATE EXTERNAL TABLE IF NOT EXISTS {name} (\n" + ",\n".join(columns) + "\n)\n"
            "PARTITIONED BY (`date` string, `hour` int)\n"
            "STORED AS PARQUET\n"
            f"LOCATION {_string(root + '/')}\n"
            "TBLPROPERTIES (\n"
            + ",\n".join(f"  {_string(key)} = {_string(value)}" for key, value in properties)
            + "\n);\n")


def athena_ddl(location: str = "s3://BUCKET/PREFIX", *, database: str = "collector",
               table_prefix: str = "", start_date: str = "2026-01-01",
               tables: tuple[str, ...] = ("flows", "packets", "sessions")) -> str:
    """The statements for every table, with a header naming what they expect."""
    if not _LOCATION.match(location.rstrip("/")):
        raise ValueError(f"--location {location!r}: expected s3://bucket/prefix")
    if not re.match(r"^[A-Za-z0-9_]+$", database) or not re.match(r"^[A-Za-z0-9_]*$", table_prefix):
        raise ValueError("database and table prefix: letters, digits and '_' only")
    if not re.match(r"^\d{4}-\d{2}-\d{2}$", start_date):
        raise ValueError(f"--start-date {start_date!r}: expected YYYY-MM-DD")
    location = "s3://" + location.split("://", 1)[1].rstrip("/")  # Athena reads s3:// only
    header = (f"-- Athena / Glue tables for the collector dataset at {location}\n"
              f"-- CREATE DATABASE IF NOT EXISTS `{database}`;\n\n")
    return header + "\n".join(table_ddl(t, location, database=database, table_prefix=table_prefix,
                                        start_date=start_date) for t in tables)
