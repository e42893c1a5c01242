"""Writing a query's result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from typing import IO

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from collector.query import QueryError

FORMATS = ("table", "csv", "json", "parquet")


def run(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The result of `sql` as an Arrow table; DuckDB's refusal as a one-line QueryError."""
    try:
        relation = con.sql(sql)
        if relation is None:  # a statement without a result (SET, CREATE VIEW...)
            return pa.table({})
        return relation.to_arrow_table()
    except duckdb.Error as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QueryError(first_line) from None


def write(result: pa.Table, fmt: str, output: str | None = None) -> None:
    """Write `result` in `fmt` to the file `output`, or to standard output."""
    if fmt == "parquet":
        if output is None:
            raise QueryError("--format parquet needs --output FILE")
        pq.write_table(result, output, compression="zstd")
        return
    with (open(output, "w", newline="") if output else _stdout()) as stream:
        {"table": _table, "csv": _csv, "json": _json}[fmt](result, stream)


class _stdout:
    def __enter__(self) -> IO[str]:
        return sys.stdout

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _table(result: pa.Table, stream: IO[str]) -> None:
    names = result.column_names
    rows = [[_cell(v) for v in row.values()] for row in result.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
               for t in result.schema.types]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    stream.write(line(names) + "\n")
    for row in rows:
        stream.write(line(row) + "\n")
    stream.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _csv(result: pa.Table, stream: IO[str]) -> None:
    writer = csv.writer(stream)
    writer.writerow(result.column_names)
    for row in result.to_pylist():
        writer.writerow(["" if v is None else v.isoformat() if isinstance(v, dt.datetime) else v
                         for v in row.values()])


def _json(result: pa.Table, stream: IO[str]) -> None:
    json.dump(result.to_pylist(), stream, default=_json_default, indent=1)
    stream.write("\n")


def _json_default(value):
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
