"""The flow journal: what a killed worker's successor writes, so that a SIGKILL or the OOM
killer loses at most one flush interval of traffic, not every open flow's whole life.

A live worker holds each open flow's counts in memory until the flow ends, up to
`active_timeout` (60 s) plus the flush interval. Every flush interval it writes its pending
rows, then replaces its journal, ROOT/_journal/<collector_id>-<writer>.arrow, with a row for
every open flow as counted so far (Arrow IPC, zstd; the flows schema, `end_reason` 'crash').
A clean stop writes every flow and removes the journal. A journal found at start belongs to
a worker that was killed: its rows are written as flows, once, and the journal removed.

Exactly once, by two fences:
- The journal records the last file sequence its writer had used. A flow that ended after the
  journal and reached a file before the kill (a flush between two journals: the writer's own
  size bound, or the milliseconds between a flush and the journal that follows it) is in a
  file of that writer with a higher sequence, in the partition of its `first_seen`: such rows
  are dropped from the journal's (same key, the journal's `first_seen` inside the file row's
  span), in the data directory and, with an object store, in the store too.
- The recovered rows are written under names fixed by the journal (writer `<writer>r`, the
  journal's sequence): a successor killed while recovering writes the same files again
  instead of a second copy.

The directory starts with '_', so dataset readers (globs of <table>/date=*/hour=*/*.parquet,
Hive discovery, Athena) never see it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from collector.store import arrow
from collector.store.manifest import fsync_directory
from collector.store.schema import FLOWS
from collector.store.writer import DatasetWriter

log = logging.getLogger("collector.journal")

JOURNAL_DIR = "_journal"
SUFFIX = ".arrow"
RECOVERED_REASON = "crash"  # end_reason of rows written from a killed worker's journal
_KEY_COLUMNS = ("vni", "vlan_id", "inner_vlan_id", "ethertype", "ip_version", "protocol")


def journal_path(root: str | os.PathLike, collector_id: str, writer_id: str) -> Path:
    return Path(root) / JOURNAL_DIR / f"{collector_id}-{writer_id}{SUFFIX}"


def write_journal(root: str | os.PathLike, collector_id: str, writer_id: str,
                  rows: pa.RecordBatch | pa.Table, sequence: int) -> Path:
    """Replace the writer's journal with `rows` (flows schema, each with the end_reason it is
    to be written with after a kill: RECOVERED_REASON for open flows, the close reason for
    closed ones) atomically: a reader, or a successor after a kill at any instant, finds the
    old journal or the new one, whole. Nothing here calls pyarrow.compute: its first call
    costs a process 44 MiB (a live worker journals every flush interval)."""
    path = journal_path(root, collector_id, writer_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows], schema=rows.schema)
    schema = table.schema.with_metadata({
        **(table.schema.metadata or {}), b"collector.journal.sequence": str(sequence).encode(),
        b"collector.journal.written_ns": str(time.time_ns()).encode()})
    temporary = path.with_name(f".{path.name}.tmp")
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    try:
        with open(temporary, "wb") as out:
            with pa.ipc.new_file(out, schema, options=options) as writer:
                writer.write_table(table.replace_schema_metadata(schema.metadata))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:  # disk full, directory gone: the old journal stays, whole
        try:
            temporary.unlink()
        except OSError:
            pass
        raise
    fsync_directory(path.parent)
    return path


def discard_journal(root: str | os.PathLike, collector_id: str, writer_id: str) -> None:
    """After a clean stop wrote every flow: nothing is left to recover."""
    try:
        journal_path(root, collector_id, writer_id).unlink()
    except FileNotFoundError:
        pass


def journals(root: str | os.PathLike, collector_id: str) -> dict[str, Path]:
    """writer id -> journal path, for this collector's journals under ROOT."""
    directory = Path(root) / JOURNAL_DIR
    prefix = f"{collector_id}-"
    found = {}
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(SUFFIX):
                found[entry.name[len(prefix):-len(SUFFIX)]] = entry
    return found


def read_journal(path: str | os.PathLike) -> tuple[pa.Table, int]:
    """The journal's rows and the last file sequence its writer had used."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        sequence = int(table.schema.metadata[b"collector.journal.sequence"])
    except (pa.ArrowInvalid, KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable flow journal: {err}") from err
    if not table.schema.equals(FLOWS, check_metadata=False):
        raise ValueError(f"{path}: not a flow journal: its columns are not the flows table's")
    return table, sequence


def claim(root: str | os.PathLike, collector_id: str, writer_id: str) -> list[Path]:
    """Take a killed writer's journal for recovery: renamed aside (<journal>.claimed-<ns>),
    so that the successor journals under the writer's name at once while it is written. Returns
    every claimed journal of that writer still to write, a predecessor's unfinished ones too."""
    path = journal_path(root, collector_id, writer_id)
    try:
        os.replace(path, path.with_name(f"{path.name}.claimed-{time.time_ns()}"))
        fsync_directory(path.parent)
    except FileNotFoundError:
        pass
    return claimed(root, collector_id, writer_id)


def claimed(root: str | os.PathLike, collector_id: str, writer_id: str) -> list[Path]:
    path = journal_path(root, collector_id, writer_id)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f"{path.name}.claimed-*")
                  if p.name.rsplit("-", 1)[1].isdigit())  # not the unreadable ones set aside


def recover(root: str | os.PathLike, collector_id: str, writer_id: str, *,
            store: tuple[pafs.FileSystem, str] | None = None) -> int:
    """Claim a killed writer's journal (if any) and write every claimed journal of that
    writer; returns the rows written."""
    return sum(recover_claimed(path, root, collector_id, writer_id, store=store)
               for path in claim(root, collector_id, writer_id))


def recover_claimed(path: Path, root: str | os.PathLike, collector_id: str, writer_id: str, *,
                    store: tuple[pafs.FileSystem, str] | None = None) -> int:
    """Write the rows of a claimed journal as flows (end_reason 'crash') and remove it;
    returns the rows written. `store`: (filesystem, prefix) of the object store the data
    directory (then the spool) uploads to, searched for files written after the journal too.
    An unreadable journal is renamed aside with a warning."""
    try:
        table, sequence = read_journal(path)
    except ValueError as err:
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        log.warning("%s; kept as %s, not recovered", err, aside)
        return 0
    table = _not_written_since(table, Path(root), collector_id, writer_id, sequence, store)
    table = _with_community_ids(table)
    if table.num_rows:
        writer = DatasetWriter(root, "flows", collector_id=collector_id,
                               writer_id=f"{writer_id}r", first_sequence=sequence)
        writer.write(table.replace_schema_metadata(FLOWS.metadata))
        writer.close()
    path.unlink()
    fsync_directory(path.parent)
    return table.num_rows


def _with_community_ids(table: pa.Table) -> pa.Table:
    """The compiled flow table journals without Community IDs (their SHA-1 is two thirds of a
    snapshot): computed here, once, for the rows that lack one."""
    from ipaddress import ip_address

    from collector.flows.community_id import community_id

    column = table.column("community_id")
    if column.null_count == 0:
        return table
    values = column.to_pylist()
    names = ("protocol", "src_addr", "dst_addr", "src_port", "dst_port")
    for i, (cid, proto, src, dst, sport, dport) in enumerate(
            zip(values, *(table.column(n).to_pylist() for n in names))):
        if cid is None and src is not None and dst is not None:
            values[i] = community_id(proto, ip_address(src).packed, ip_address(dst).packed,
                                     sport, dport)
    return table.set_column(table.schema.get_field_index("community_id"), "community_id",
                            arrow.strings(values))


def _endpoint_pairs(table: pa.Table) -> list[tuple]:
    """Per row: the flow's key with its two endpoints in a fixed order, whichever of them a
    row calls src (a SYN seen after a snapshot can turn a flow round)."""
    columns = [table.column(name).to_pylist() for name in _KEY_COLUMNS]
    src = zip(table.column("src_addr").to_pylist(), table.column("src_port").to_pylist())
    dst = zip(table.column("dst_addr").to_pylist(), table.column("dst_port").to_pylist())
    keys = []
    for fixed, one, other in zip(zip(*columns), src, dst):
        one = (one[0] or "", -1 if one[1] is None else one[1])
        other = (other[0] or "", -1 if other[1] is None else other[1])
        keys.append(fixed + (min(one, other), max(one, other)))
    return keys


def _not_written_since(table: pa.Table, root: Path, collector_id: str, writer_id: str,
                       sequence: int, store) -> pa.Table:
    """The journal's rows minus the flows that reached a file after it (see the module)."""
    if table.num_rows == 0:
        return table
    first = arrow.int64_values(table.column("first_seen"))
    hours = sorted(set((first // 3_600_000_000).tolist()))
    later = _later_files(root, collector_id, writer_id, sequence, hours, store)
    if not later:  # the usual case
        return table
    spans: dict[tuple, list[tuple[int, int]]] = {}
    for filesystem, file in later:
        written = pq.read_table(file, filesystem=filesystem,
                                columns=[*_KEY_COLUMNS, "src_addr", "src_port", "dst_addr",
                                         "dst_port", "first_seen", "last_seen"])
        begin = arrow.int64_values(written.column("first_seen")).tolist()
        end = arrow.int64_values(written.column("last_seen")).tolist()
        for key, b, e in zip(_endpoint_pairs(written), begin, end):
            spans.setdefault(key, []).append((b, e))
    keep = [not any(b <= seen <= e for b, e in spans.get(key, ()))
            for key, seen in zip(_endpoint_pairs(table), first.tolist())]
    dropped = keep.count(False)
    if dropped:
        log.info("journal of %s-%s: %d flows reached a file after it; not written twice",
                 collector_id, writer_id, dropped)
    return table.filter(pa.array(keep, pa.bool_()))


def _later_files(root: Path, collector_id: str, writer_id: str, sequence: int, hours: list[int],
                 store) -> list[tuple[pafs.FileSystem | None, str]]:
    """Flows files of this writer with a sequence past the journal's, in the partitions of
    the hours given: in the data directory, and in the store when there is one."""
    name = re.compile(re.escape(f"{collector_id}-{writer_id}-") + r"(\d+)\.parquet$")
    found = []
    for hour in hours:
        when = time.gmtime(hour * 3600)
        partition = f"flows/date={time.strftime('%Y-%m-%d', when)}/hour={when.tm_hour:02d}"
        directory = root / partition
        if directory.is_dir():
            for entry in directory.iterdir():
                match = name.match(entry.name)
                if match and int(match.group(1)) > sequence:
                    found.append((None, str(entry)))
        if store is not None:
            filesystem, prefix = store
            selector = pafs.FileSelector(f"{prefix.rstrip('/')}/{partition}", allow_not_found=True)
            for info in filesystem.get_file_info(selector):
                match = name.match(info.base_name)
                if match and int(match.group(1)) > sequence:
                    found.append((filesystem, info.path))
    return found
