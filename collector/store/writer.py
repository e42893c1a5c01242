"""Parquet dataset writer: the one module that writes data files.

Layout: ROOT/<table>/date=YYYY-MM-DD/hour=HH/<collector_id>-<writer>-<sequence>.parquet,
partitioned by the UTC hour of the table's time column (first_seen, ts). Files appear
atomically: each is written under a hidden temporary name in its partition, flushed to disk,
then renamed into place, so a reader (whose glob is *.parquet) never sees half a file. Rows are
buffered and written when `max_rows` accumulate or the oldest buffered row has waited
`flush_seconds` (checked by `tick`), so live data is queryable within seconds.

Faults. A write that fails (disk full, directory read-only or gone) leaves no file behind: its
temporaries are removed and the rows stay pending, to be retried every `retry_seconds`. The
rows a writer may hold are bounded by `max_pending_bytes`: past it the oldest pending rows are
dropped and counted in `stats.dropped` by reason (never silently). A writer killed outright
(SIGKILL, power loss) can leave a hidden temporary behind: `remove_stale_temporaries` clears a
collector's own at its next start.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collector.store import arrow
from collector.store.schema import TABLES

PARTITION_COLUMN = {"flows": "first_seen", "packets": "ts", "sessions": "loaded_at"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
TEMPORARY_SUFFIX = ".parquet.tmp"
# Why rows were dropped, from the errno of the write that kept failing (a metric label).
DROP_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
                errno.EACCES: "read_only", errno.EPERM: "read_only"}


@dataclass
class WriteStats:
    files: int = 0
    rows: int = 0
    bytes: int = 0
    last_flush_seconds: float = 0.0
    last_error: str | None = None
    last_errno: int | None = None
    failures: int = 0  # flush attempts that failed
    dropped: dict = field(default_factory=dict)  # reason -> rows dropped past max_pending_bytes
    paths: list[Path] = field(default_factory=list)

    @property
    def dropped_rows(self) -> int:
        return sum(self.dropped.values())


class DatasetWriter:
    """Buffers rows of one table and writes them as partitioned Parquet files."""

    def __init__(self, root: str | os.PathLike, table: str, *, collector_id: str,
                 writer_id: str = "0", max_rows: int = 1_000_000, flush_seconds: float = 10.0,
                 row_group_rows: int = 1024 * 1024, max_pending_bytes: int | None = None,
                 retry_seconds: float | None = None, first_sequence: int | None = None) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        for label, value in (("collector id", collector_id), ("writer id", writer_id)):
            if not _SAFE_NAME.match(value):
                raise ValueError(f"{label} {value!r} must be letters, digits, '.', '_' or '-'")
        if max_rows < 1 or flush_seconds <= 0:
            raise ValueError("max_rows must be >= 1 and flush_seconds > 0")
        if max_pending_bytes is not None and max_pending_bytes < 1:
            raise ValueError("max_pending_bytes must be >= 1 (None: unbounded)")
        self.root = Path(root)
        self.table = table
        self.schema = TABLES[table]
        self.collector_id, self.writer_id = collector_id, writer_id
        self.max_rows, self.flush_seconds = max_rows, flush_seconds
        self.row_group_rows = row_group_rows
        self.max_pending_bytes = max_pending_bytes
        # After a failed write, automatic retries (write, tick) wait this long: a full disk
        # must not cost a Parquet encode on every received batch. `flush()` always tries.
        self.retry_seconds = flush_seconds if retry_seconds is None else retry_seconds
        self.stats = WriteStats()
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._oldest: float | None = None  # monotonic time the oldest pending row came in
        self._retry_at = 0.0  # monotonic: no automatic flush before this
        # Sequences start at the wall-clock milliseconds of this writer's start, so that a
        # restarted collector never reuses a file name. `first_sequence`: names fixed by the
        # caller instead, so that writing the same rows again replaces the same files (the
        # journal's recovery, collector/store/journal.py).
        self._sequence = (int(time.time() * 1000) * 1000 if first_sequence is None
                          else first_sequence)
        self._fixed_names = first_sequence is not None

    @property
    def sequence(self) -> int:
        """The sequence of the last file written (files written later have higher ones)."""
        return self._sequence

    def write(self, rows: pa.RecordBatch | pa.Table, now: float | None = None) -> None:
        """Buffer rows (matching the table's schema); flush when `max_rows` are pending."""
        if rows.num_rows == 0:
            return
        batch = rows if isinstance(rows, pa.RecordBatch) else rows.combine_chunks().to_batches()[0]
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"rows do not match the {self.table} schema:\n{batch.schema}")
        now = time.monotonic() if now is None else now
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        if self._oldest is None:
            self._oldest = now
        if self._pending_rows >= self.max_rows or self._over_bound():
            self._try_flush(now)
        if self._over_bound():
            self._drop_oldest()

    def tick(self, now: float | None = None) -> None:
        """Flush when the oldest pending row has waited `flush_seconds` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        if self._oldest is not None and now - self._oldest >= self.flush_seconds:
            self._try_flush(now)

    def try_flush(self, now: float | None = None) -> None:
        """Write every pending row now, as `tick` would once they are old enough (the
        pipeline's interim export wants its rows on disk at once)."""
        self._try_flush(time.monotonic() if now is None else now)

    def _try_flush(self, now: float) -> None:
        """A flush that `write` or `tick` starts: a failure keeps the rows pending and is
        reported in stats.last_error (the caller's health), not raised into the receive path."""
        if now < self._retry_at:
            return
        try:
            self.flush()
        except OSError:
            self._retry_at = now + self.retry_seconds

    def _over_bound(self) -> bool:
        return self.max_pending_bytes is not None and self._pending_bytes > self.max_pending_bytes

    def _drop_oldest(self) -> None:
        """Past `max_pending_bytes` (writes keep failing): the oldest rows go, counted by the
        reason the writes fail. The newest batch is kept even alone over the bound."""
        reason = DROP_REASONS.get(self.stats.last_errno, "write_error")
        while self._over_bound() and len(self._pending) > 1:
            batch = self._pending.pop(0)
            self._pending_rows -= batch.num_rows
            self._pending_bytes -= batch.nbytes
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + batch.num_rows

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    @property
    def pending_bytes(self) -> int:
        """Arrow bytes of the rows waiting to be written (what `max_pending_bytes` bounds)."""
        return self._pending_bytes

    def flush(self) -> list[Path]:
        """Write every pending row now, in files of at most `max_rows` rows; returns the files
        written. On an error (disk full, directory gone) the rows not yet in a file stay
        pending, the error is kept in stats.last_error and raised; the next flush retries."""
        if not self._pending:
            return []
        started = time.monotonic()
        written: list[Path] = []
        try:
            while self._pending:
                count, rows = 0, 0
                while count < len(self._pending) and (count == 0 or rows + self._pending[count].num_rows <= self.max_rows):
                    rows += self._pending[count].num_rows
                    count += 1
                chunk = self._pending[:count]
                table = pa.Table.from_batches(chunk, schema=self.schema)
                files = self._commit(table)
                del self._pending[:count]
                self._pending_rows -= table.num_rows
                self._pending_bytes -= sum(batch.nbytes for batch in chunk)
                self.stats.files += len(files)
                self.stats.rows += table.num_rows
                self.stats.paths.extend(files)
                written.extend(files)
        except OSError as err:
            self.stats.last_error = f"{type(err).__name__}: {err}"
            self.stats.last_errno = err.errno
            self.stats.failures += 1
            raise
        self._pending_bytes = 0
        self._oldest = None
        self._retry_at = 0.0
        self.stats.last_flush_seconds = time.monotonic() - started
        self.stats.last_error = self.stats.last_errno = None
        return written

    def close(self) -> list[Path]:
        return self.flush()

    def _commit(self, table: pa.Table) -> list[Path]:
        """All or nothing: every partition's file is written and synced under its temporary
        name first, then all are renamed into place. A failure removes the temporaries (and
        any file already renamed), so that the retry rewrites every row exactly once."""
        staged: list[tuple[Path, Path]] = []
        renamed: list[Path] = []
        try:
            for (date, hour), part in _partitions(table, PARTITION_COLUMN[self.table]):
                staged.append(self._write_temporary(part, date, hour))
            for temporary, final in staged:
                os.replace(temporary, final)
                renamed.append(final)
            for directory in {final.parent for _, final in staged}:
                _fsync_directory(directory)  # the renames survive a power loss
        except BaseException:
            for temporary, _ in staged:
                temporary.unlink(missing_ok=True)
            for final in renamed:
                final.unlink(missing_ok=True)
            raise
        for _, final in staged:
            self.stats.bytes += final.stat().st_size
        return [final for _, final in staged]

    def _write_temporary(self, part: pa.Table, date: str, hour: str) -> tuple[Path, Path]:
        # A directory deleted while running is made again here (the writer's next flush).
        directory = self.root / self.table / f"date={date}" / f"hour={hour}"
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._sequence += 1
            name = f"{self.collector_id}-{self.writer_id}-{self._sequence}.parquet"
            final = directory / name
            # names fixed by `first_sequence` replace what an interrupted run wrote under them
            if self._fixed_names or not final.exists():
                break
        temporary = directory / f".{name}.tmp"
        try:
            with open(temporary, "wb") as sink:
                pq.write_table(part, sink, compression="zstd", row_group_size=self.row_group_rows,
                               use_dictionary=_dictionary_columns(part.schema))
                sink.flush()
                os.fsync(sink.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary, final


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(root: str | os.PathLike, collector_id: str,
                             writer_id: str | None = None) -> list[Path]:
    """Remove the hidden temporaries that writers of `collector_id` (only `writer_id`'s when
    given) left in ROOT/<table>/date=*/hour=*/ when they were killed mid-write; returns them.
    Call it only when none of those writers runs. Readers never see temporaries (*.parquet
    globs skip them); this reclaims their space. Other collectors' files are left alone."""
    prefix = f".{collector_id}-" + (f"{writer_id}-" if writer_id is not None else "")
    removed = []
    for table in TABLES:
        for directory in Path(root, table).glob("date=*/hour=*"):
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(TEMPORARY_SUFFIX):
                    try:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                    except FileNotFoundError:
                        pass
    return removed


# Columns whose values are all but unique (a Community ID is a hash): a dictionary of them is
# as large as the values and is abandoned page by page, so they are written plain.
_HIGH_CARDINALITY = frozenset({"community_id"})


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Dictionary-encode every column but the hashes. With 1 Mi-row row groups (one per file
    of up to a million rows) a flow row takes 39.4 bytes of Parquet against 43.4 with 128 Ki
    rows: addresses, ports and sessions repeat across a million rows, and each row group
    pays for its own dictionaries (bench/flows.py)."""
    return [name for name in schema.names if name not in _HIGH_CARDINALITY]


def _partitions(table: pa.Table, column: str):
    """(date, hour) -> rows, by the UTC hour of `column` (NULL times go to 1970-01-01/00)."""
    micros = arrow.int64_values(table[column], null=0)
    hours = micros // 3_600_000_000
    # The distinct hours, sorted: np.unique's own way, without its import of numpy.ma (15 ms
    # of a process's start), and without a sort when every row is in one hour (the usual case).
    if len(hours) == 0 or hours.min() == hours.max():
        distinct = hours[:1]
    else:
        ordered = np.sort(hours)
        distinct = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
    for hour in distinct:
        rows = np.flatnonzero(hours == hour)
        stamp = np.datetime64(int(hour), "h")
        date, hh = str(stamp.astype("datetime64[D]")), f"{int(hour) % 24:02d}"
        if rows[-1] - rows[0] + 1 == len(rows):
            # one run of rows (the usual case: a flush within one hour, or rows in time
            # order): a zero-copy slice, where a take copies every column (1 s at 10^6 rows)
            yield (date, hh), table.slice(int(rows[0]), len(rows))
        else:
            yield (date, hh), table.take(arrow.numeric(rows))
