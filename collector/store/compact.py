"""Compaction: the many small files of a closed hour become a few large sorted ones.

Readers never see a row twice nor miss one while it runs, because the switch from the old files
to the new is one atomic write, a new generation of the partition's manifest
(collector/store/manifest.py), and because no file a reader may still open is deleted before
`grace` seconds have passed. One run, for each partition of each table:

1. maintenance (work left by earlier runs whose grace has passed):
   - publish: a compacted file committed as `_compact~X.parquet` (a name Hive engines
     ignore) gets its second name `compact~X.parquet` (a hard link locally, a server-side copy
     on S3), the name Athena and Spark read;
   - then delete the files it superseded (Hive engines now read the compacted file instead);
   - delete the `_compact~X` name once the published name has existed `grace` seconds;
   - delete what a crashed run left: compacted files no manifest names, temporaries;
   - record this in a new manifest generation; delete generations older than `grace`.
2. compaction of a *closed* hour (its end is `older_than` seconds past, so writers are done
   with it; a straggler that still comes is safe, only left for the next run): the partition's
   live plain files and its compacted files smaller than `target_rows` are read, merged,
   sorted by time, written as `_compact~X.parquet` files (zstd, `row_group_rows` row groups),
   and committed: the new generation names them live and the inputs superseded.
3. maintenance again (with `grace` 0 the run finishes its own work).

A crash (or kill -9) between any two steps leaves a dataset that reads the same rows: before the
commit the new files are not live, after it the old ones are not, and the next run finishes or
removes what was left. One compaction at a time per dataset (a lock file locally; on S3 run it
from one place). The `hook(step, detail)` argument is called after every durable step, so tests
can stop a run there.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from collector.store.manifest import (COMPACTED_PREFIX, HIDDEN_PREFIX, Location, Manifest,
                                      compacted_name, is_live, list_files, location_of,
                                      manifest_paths, partition_listing, read_manifest,
                                      write_manifest)
from collector.store.schema import METADATA, TABLES
from collector.store.writer import PARTITION_COLUMN

DEFAULT_TARGET_ROWS = 2_000_000
DEFAULT_ROW_GROUP_ROWS = 128 * 1024
DEFAULT_OLDER_THAN = 3600.0  # seconds after an hour's end before it counts as closed
DEFAULT_GRACE = 600.0  # seconds a superseded file stays for readers that listed it

Hook = Callable[[str, str], None]


class CompactError(RuntimeError):
    """Compaction could not proceed (another run holds the lock or committed meanwhile)."""


@dataclass
class PartitionResult:
    table: str
    partition: str
    action: str  # compacted, planned (dry run), open, nothing
    files_in: int = 0
    rows: int = 0
    files_out: int = 0
    published: int = 0
    deleted: int = 0


@dataclass
class CompactResult:
    partitions: list[PartitionResult] = field(default_factory=list)

    @property
    def compacted(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.action in ("compacted", "planned")]


@dataclass(frozen=True)
class Settings:
    older_than: float = DEFAULT_OLDER_THAN
    target_rows: int = DEFAULT_TARGET_ROWS
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    grace: float = DEFAULT_GRACE
    dry_run: bool = False


def hour_is_closed(partition: str, now: float, older_than: float) -> bool:
    """An hour is closed when its end lies `older_than` seconds or more in the past."""
    date, hour = partition.split("/")
    start = dt.datetime.strptime(date[len("date="):], "%Y-%m-%d").replace(
        tzinfo=dt.timezone.utc) + dt.timedelta(hours=int(hour[len("hour="):]))
    return start.timestamp() + 3600 + older_than <= now


def compact(data, *, tables: Iterable[str] = ("flows", "packets"), settings: Settings = Settings(),
            now: float | None = None, hook: Hook | None = None) -> CompactResult:
    """Compact the closed hours of `tables` under `data` (a directory or s3://bucket/prefix)."""
    location = location_of(data)
    hook = hook or (lambda step, detail: None)
    result = CompactResult()
    for table in tables:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    with _lock(location, settings.dry_run):
        for table in tables:
            for partition, names in sorted(_partitions(location, table).items()):
                moment = time.time() if now is None else now
                result.partitions.append(
                    _partition(location, table, partition, names, moment, settings, hook))
    return result


@contextmanager
def _lock(location: Location, dry_run: bool):
    """One compaction at a time on a local dataset (an S3 prefix has no lock: one scheduler)."""
    if not location.is_local or dry_run or not os.path.isdir(location.path):
        yield
        return
    with open(os.path.join(location.path, ".compact.lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactError(f"another `collector compact` is running on {location.path}") from None
        yield


def _partitions(location: Location, table: str) -> dict[str, set[str]]:
    """partition -> names of the files in it (every name, temporaries included)."""
    return {partition: set(names) for partition, names in partition_listing(location, table).items()}


def _partition(location: Location, table: str, partition: str, names: set[str], now: float,
               settings: Settings, hook: Hook) -> PartitionResult:
    result = PartitionResult(table, partition, "nothing")
    if not settings.dry_run:
        _maintain(location, table, partition, names, now, settings.grace, hook, result)
    if not hour_is_closed(partition, now, settings.older_than):
        result.action = "open"
        return result
    _, manifest = read_manifest(location, table, partition)
    names = _names(location, table, partition)
    inputs = _inputs(names, manifest, settings.target_rows)
    if len(inputs) < 2 or all(compacted_name(name) for name in inputs):
        return result  # nothing new to merge (a single file is already one file)
    result.files_in = len(inputs)
    if settings.dry_run:
        result.action = "planned"
        result.rows = sum(_rows(location, table, partition, name) for name in inputs)
        return result
    hook("planned", f"{table}/{partition}")
    _merge(location, table, partition, manifest, inputs, now, settings, hook, result)
    result.action = "compacted"
    _maintain(location, table, partition, _names(location, table, partition), now,
              settings.grace, hook, result)
    return result


def _names(location: Location, table: str, partition: str) -> set[str]:
    prefix = location.join(table, partition) + "/"
    return {path[len(prefix):] for path in list_files(location, prefix.rstrip("/"))
            if "/" not in path[len(prefix):]}


def _inputs(names: set[str], manifest: Manifest, target_rows: int) -> list[str]:
    """The files to merge: every live plain file, and the live compacted files that are not
    full yet (so stragglers join the last, partial one instead of adding a small file)."""
    plain = sorted(n for n in names if compacted_name(n) is None and is_live(n, manifest))
    small = sorted(COMPACTED_PREFIX + x + ".parquet" for x, entry in manifest.live.items()
                   if entry["rows"] < target_rows)
    return plain + small if plain else []


def _existing_name(names: set[str], name: str) -> str:
    """The name under which a (possibly compacted) file exists in the partition now."""
    logical = compacted_name(name)
    if logical is None or name in names:
        return name
    return HIDDEN_PREFIX + logical + ".parquet"


def _rows(location: Location, table: str, partition: str, name: str) -> int:
    path = location.join(table, partition, _existing_name(_names(location, table, partition), name))
    with location.filesystem.open_input_file(path) as source:
        return pq.ParquetFile(source).metadata.num_rows


def _merge(location: Location, table: str, partition: str, manifest: Manifest, inputs: list[str],
           now: float, settings: Settings, hook: Hook, result: PartitionResult) -> None:
    names = _names(location, table, partition)
    parts = []
    for name in inputs:
        path = location.join(table, partition, _existing_name(names, name))
        with location.filesystem.open_input_file(path) as source:
            parts.append(pq.ParquetFile(source).read())
    merged = _conform(pa.concat_tables(parts, promote_options="permissive"), TABLES[table])
    merged = merged.sort_by([(PARTITION_COLUMN[table], "ascending")])
    result.rows = merged.num_rows
    run = f"{dt.datetime.fromtimestamp(now, dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    written: dict[str, dict] = {}
    for index, start in enumerate(range(0, max(merged.num_rows, 1), settings.target_rows)):
        chunk = merged.slice(start, settings.target_rows)
        logical = f"{run}-{index}"
        _write_parquet(location, location.join(table, partition, HIDDEN_PREFIX + logical + ".parquet"),
                       chunk, settings.row_group_rows)
        written[logical] = {"rows": chunk.num_rows, "committed_at": now, "published_at": None}
        hook("wrote", logical)
    # The commit. Generations are numbered: a run that finds a newer one than it planned
    # from (a second compactor) gives up rather than overwrite it.
    _, current = read_manifest(location, table, partition)
    if current.generation != manifest.generation:
        for logical in written:
            _delete(location, location.join(table, partition, HIDDEN_PREFIX + logical + ".parquet"))
        raise CompactError(f"{table}/{partition}: another compaction committed meanwhile")
    live = {x: entry for x, entry in manifest.live.items()
            if COMPACTED_PREFIX + x + ".parquet" not in inputs}
    live.update(written)
    superseded = dict(manifest.superseded)
    superseded.update({name: now for name in inputs})
    write_manifest(location, table, partition,
                   Manifest(manifest.generation + 1, now, live, superseded))
    result.files_out = len(written)
    hook("committed", f"{table}/{partition}")


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table's columns in the current schema's order and types (files of older schema
    versions lack newer columns: NULL), any unknown extra column kept after them."""
    columns, fields = [], []
    for target in schema:
        if target.name in table.column_names:
            columns.append(table[target.name].cast(target.type))
        else:
            columns.append(pa.nulls(table.num_rows, target.type))
        fields.append(target)
    for extra in table.schema:
        if extra.name not in schema.names:
            columns.append(table[extra.name])
            fields.append(extra)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=METADATA))


def _write_parquet(location: Location, path: str, table: pa.Table, row_group_rows: int) -> None:
    """A compacted file, whole or absent: locally a fsynced temporary renamed into place."""
    if location.is_local:
        directory, _, name = path.rpartition("/")
        temporary = f"{directory}/.{name}.tmp"
        try:
            with open(temporary, "wb") as sink:
                pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temporary, path)
        except BaseException:
            _delete(location, temporary)
            raise
    else:  # an S3 object appears when its upload completes, never in part
        with location.filesystem.open_output_stream(path) as sink:
            pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)


def _maintain(location: Location, table: str, partition: str, names: set[str], now: float,
              grace: float, hook: Hook, result: PartitionResult) -> None:
    path, manifest = read_manifest(location, table, partition)
    directory = location.join(table, partition)
    for name in sorted(names):
        logical = compacted_name(name)
        orphan = (logical is not None and logical not in manifest.live
                  and COMPACTED_PREFIX + logical + ".parquet" not in manifest.superseded)
        leftover = name.startswith((".compact~", "._compact~"))
        if orphan or leftover:  # a run that crashed before its commit
            _delete(location, f"{directory}/{name}")
    if path is None:
        return
    live = {x: dict(entry) for x, entry in manifest.live.items()}
    superseded = dict(manifest.superseded)
    changed = False
    for logical, entry in sorted(live.items()):
        published = COMPACTED_PREFIX + logical + ".parquet"
        if entry["published_at"] is None and now - entry["committed_at"] >= grace:
            if published not in names:
                _copy(location, f"{directory}/{HIDDEN_PREFIX}{logical}.parquet", f"{directory}/{published}")
                names.add(published)
                result.published += 1
                hook("published", logical)
            entry["published_at"] = now
            changed = True
    due = [name for name, since in sorted(superseded.items()) if now - since >= grace]
    victims = []  # deleted even if not listed: absent is fine, kept is not
    for name in due:
        logical = compacted_name(name)
        victims += [name] if logical is None else [COMPACTED_PREFIX + logical + ".parquet",
                                                   HIDDEN_PREFIX + logical + ".parquet"]
    # Hive engines may count this hour twice from the publication until the last deletion.
    # (Deleting in parallel was measured slower against a local SeaweedFS: one at a time.)
    for victim in victims:
        _delete(location, f"{directory}/{victim}")
        if victim in names:
            result.deleted += 1
            hook("deleted", victim)
    for name in due:
        del superseded[name]
        changed = True
    for logical, entry in live.items():
        hidden = HIDDEN_PREFIX + logical + ".parquet"
        if (entry["published_at"] is not None and now - entry["published_at"] >= grace
                and hidden in names):
            _delete(location, f"{directory}/{hidden}")
            hook("unhidden", logical)
    if changed:
        write_manifest(location, table, partition,
                       Manifest(manifest.generation + 1, now, live, superseded))
        hook("maintained", f"{table}/{partition}")
    paths = manifest_paths(location, table, partition)
    if paths:
        _, latest = read_manifest(location, table, partition)
        if now - latest.committed_at >= grace:
            for old in paths[:-1]:
                _delete(location, old)


def _copy(location: Location, source: str, target: str) -> None:
    """A second name for a file, appearing whole: a hard link locally (atomic, no bytes
    copied), a server-side copy on S3 (the object appears when the copy completes)."""
    if location.is_local:
        try:
            os.link(source, target)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: a copy, appearing whole
            directory, _, name = target.rpartition("/")
            temporary = f"{directory}/.{name}.tmp"
            shutil.copyfile(source, temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
    else:
        location.filesystem.copy_file(source, target)


def _delete(location: Location, path: str) -> None:
    try:
        location.filesystem.delete_file(path)
    except FileNotFoundError:
        pass
