"""Parquet dataset writer: the one module that writes data files.

Layout: ROOT/<table>/date=YYYY-MM-DD/hour=HH/<collector_id>-<writer>-<sequence>.parquet,
partitioned by the UTC hour of the table's time column (first_seen, ts). Files appear
atomically: each is written under a hidden temporary name in its partition, flushed to disk,
then renamed into place, so a reader (whose glob is *.parquet) never sees half a file. Rows are
buffered and written when `max_rows` accumulate or the oldest buffered row has waited
`flush_seconds` (checked by `tick`), so live data is queryable within seconds.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collector.store.schema import TABLES

PARTITION_COLUMN = {"flows": "first_seen", "packets": "ts", "sessions": "loaded_at"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class WriteStats:
    files: int = 0
    rows: int = 0
    bytes: int = 0
    last_flush_seconds: float = 0.0
    last_error: str | None = None
    paths: list[Path] = field(default_factory=list)


class DatasetWriter:
    """Buffers rows of one table and writes them as partitioned Parquet files."""

    def __init__(self, root: str | os.PathLike, table: str, *, collector_id: str,
                 writer_id: str = "0", max_rows: int = 1_000_000, flush_seconds: float = 10.0,
                 row_group_rows: int = 128 * 1024) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        for label, value in (("collector id", collector_id), ("writer id", writer_id)):
            if not _SAFE_NAME.match(value):
                raise ValueError(f"{label} {value!r} must be letters, digits, '.', '_' or '-'")
        if max_rows < 1 or flush_seconds <= 0:
            raise ValueError("max_rows must be >= 1 and flush_seconds > 0")
        self.root = Path(root)
        self.table = table
        self.schema = TABLES[table]
        self.collector_id, self.writer_id = collector_id, writer_id
        self.max_rows, self.flush_seconds = max_rows, flush_seconds
        self.row_group_rows = row_group_rows
        self.stats = WriteStats()
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._oldest: float | None = None  # monotonic time the oldest pending row came in
        # Sequences start at the wall-clock milliseconds of this writer's start, so that a
        # restarted collector never reuses a file name.
        self._sequence = int(time.time() * 1000) * 1000

    def write(self, rows: pa.RecordBatch | pa.Table, now: float | None = None) -> None:
        """Buffer rows (matching the table's schema); flush when `max_rows` are pending."""
        if rows.num_rows == 0:
            return
        batch = rows if isinstance(rows, pa.RecordBatch) else rows.combine_chunks().to_batches()[0]
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"rows do not match the {self.table} schema:\n{batch.schema}")
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._oldest is None:
            self._oldest = time.monotonic() if now is None else now
        if self._pending_rows >= self.max_rows:
            self._try_flush()

    def tick(self, now: float | None = None) -> None:
        """Flush when the oldest pending row has waited `flush_seconds` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        if self._oldest is not None and now - self._oldest >= self.flush_seconds:
            self._try_flush()

    def _try_flush(self) -> None:
        """A flush that `write` or `tick` starts: a failure keeps the rows pending and is
        reported in stats.last_error (the caller's health), not raised into the receive path."""
        try:
            self.flush()
        except OSError:
            pass

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def flush(self) -> list[Path]:
        """Write every pending row now; returns the files written. On an error (disk full,
        directory gone) the rows stay pending, the error is kept in stats.last_error and
        raised; the next flush retries them all."""
        if not self._pending:
            return []
        started = time.monotonic()
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        written = []
        try:
            for (date, hour), part in _partitions(table, PARTITION_COLUMN[self.table]):
                written.append(self._write_file(part, date, hour))
        except OSError as err:
            self.stats.last_error = f"{type(err).__name__}: {err}"
            for path in written:  # all or nothing: the retry rewrites every partition
                path.unlink(missing_ok=True)
            raise
        self._pending.clear()
        self._pending_rows = 0
        self._oldest = None
        self.stats.files += len(written)
        self.stats.rows += table.num_rows
        self.stats.last_flush_seconds = time.monotonic() - started
        self.stats.last_error = None
        self.stats.paths.extend(written)
        return written

    def close(self) -> list[Path]:
        return self.flush()

    def _write_file(self, part: pa.Table, date: str, hour: str) -> Path:
        directory = self.root / self.table / f"date={date}" / f"hour={hour}"
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._sequence += 1
            name = f"{self.collector_id}-{self.writer_id}-{self._sequence}.parquet"
            final = directory / name
            if not final.exists():
                break
        temporary = directory / f".{name}.tmp"
        try:
            with open(temporary, "wb") as sink:
                pq.write_table(part, sink, compression="zstd", row_group_size=self.row_group_rows)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self.stats.bytes += final.stat().st_size
        return final


def _partitions(table: pa.Table, column: str):
    """(date, hour) -> rows, by the UTC hour of `column` (NULL times go to 1970-01-01/00)."""
    micros = pc.cast(table[column], pa.int64()).to_numpy(zero_copy_only=False)
    micros = np.nan_to_num(micros, nan=0).astype(np.int64) if micros.dtype.kind == "f" else micros
    hours = micros // 3_600_000_000
    for hour in np.unique(hours):
        rows = np.flatnonzero(hours == hour)
        stamp = np.datetime64(int(hour), "h")
        date, hh = str(stamp.astype("datetime64[D]")), f"{int(hour) % 24:02d}"
        yield (date, hh), table.take(pa.array(rows))
