"""Offline ingest: capture files through the same pipeline as live traffic.

A UDP 4789 / 4790 / 6081 datagram in a capture is a mirrored copy (the capture was taken on
an appliance) and is decapsulated; any other frame is itself a mirrored packet, recorded under
`vni` (NULL when not given). Frames of other link types (Linux SLL, NULL, raw IP) get an
Ethernet header with the right ethertype, as AWS would deliver them. Timestamps come from the
capture, and so does the clock that expires flows.

Records are gathered into receive-slot batches (as the live listener does) and decoded with
`decode_batch`, one batch per mirror port. A capture that is cut or corrupt raises
`CaptureError` naming the file and offset, after everything read before it has been metered
and written.

Two walks fill the batches, with the same result: `collector._fastcapture` (C) over the file
mapped in memory, when it is built and the file is a regular one, and otherwise (a pipe, an
empty file, COLLECTOR_PURE_PYTHON=1) the reference, `read_capture` + `outer_datagram` +
`_route` in Python, which is the readable statement of every rule the C code follows.
tests/test_fastcapture.py holds them equal: batches, ticks, counters and errors.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from collector.capture import CaptureError, Record, read_capture
from collector.compiled import extension
from collector.decode import GENEVE_PORT, VXLAN_GPE_PORT, VXLAN_PORT, decode_batch
from collector.decode.outer import link_layer, outer_datagram
from collector.flows import fast
from collector.pipeline import Pipeline

BATCH_ROWS = 4096  # rows of a receive slab made on its own (see _Batches for ingest's)
SLAB_BYTES = 4 << 20  # ingest's slab per port: large batches amortise the per-batch work
TICK_NS = 1_000_000_000  # expire flows once per second of capture time
HEADER_SLOT = 192  # bytes of each datagram the decoder needs (GENEVE + GWLB options + headers)
_VXLAN_NO_VNI = b"\x08\x00\x00\x00\x00\x00\x00\x00"
_ETHERNET_PAD = b"\x00" * 12  # synthesised MAC addresses
PORTS = (VXLAN_PORT, VXLAN_GPE_PORT, GENEVE_PORT)  # mirror ports, in the compiled walker's order
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class IngestResult:
    files: int = 0
    records: int = 0
    mirror_datagrams: int = 0
    plain_packets: int = 0
    skipped: int = 0  # frames that are neither (a link type or ethertype that carries no IP)
    bytes_read: int = 0
    paths: list[Path] = field(default_factory=list)


class _Slots:
    """One port's batch being filled: fixed-width rows plus real lengths and timestamps."""

    def __init__(self, port: int, width: int, batch_rows: int = BATCH_ROWS) -> None:
        self.port = port
        self.buf = np.zeros((batch_rows, width), dtype=np.uint8)
        self.lengths = np.zeros(batch_rows, dtype=np.int64)
        self.present = np.zeros(batch_rows, dtype=np.int64)  # bytes of the row that are data
        self.ts = np.zeros(batch_rows, dtype=np.int64)
        self.no_vni = np.zeros(batch_rows, dtype=bool)
        self.rows = 0

    def add(self, payload, length: int, ts: int, no_vni: bool = False) -> bool:
        """Add a datagram; True when the batch is full."""
        row, width = self.rows, self.buf.shape[1]
        head = payload[:width]
        self.buf[row, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        if len(head) < width:  # no bytes of an earlier datagram behind this one's
            self.buf[row, len(head) :] = 0
        # A snaplen may have cut the datagram: `present` says where its bytes end in the row.
        self.present[row] = len(head)
        self.lengths[row], self.ts[row], self.no_vni[row] = length, ts, no_vni
        self.rows += 1
        return self.rows == len(self.buf)


def ingest(paths: Iterable[str | os.PathLike], pipeline: Pipeline, *, vni: int | None = None,
           progress: Callable[[int], None] | None = None) -> IngestResult:
    """Meter every packet of the captures at `paths` into `pipeline`, then close it.

    `progress(n)` is called with the bytes of capture read since its last call.
    """
    if vni is not None and not 0 <= vni < 1 << 24:
        raise ValueError(f"VNI {vni} outside 0..16777215")
    result = IngestResult()
    width = HEADER_SLOT + pipeline.packet_bytes if pipeline.packet_writer else HEADER_SLOT
    batches = _Batches(width, vni, feed=lambda slots: _feed(pipeline, slots), tick=pipeline.tick)
    fast = extension("_fastcapture")
    try:
        for path in paths:
            result.files += 1
            last_offset = None
            if fast is not None:
                last_offset = _walk_compiled(fast, path, batches, result, progress)
            if last_offset is None:  # no compiled walker, or a file it cannot map
                last_offset = _walk_records(path, batches, result, progress)
            size = Path(path).stat().st_size
            result.bytes_read += size
            if progress is not None:
                progress(size - last_offset)
    finally:
        # Whatever was read before an error is metered and written: nothing accepted is lost.
        batches.feed_all()
        pipeline.close(reason="shutdown")
        result.paths = list(pipeline.flow_writer.stats.paths)
    return result


class _Batches:
    """The receive slots of the three mirror ports, and the capture clock that expires flows.

    `feed(slots)` is called with a port's slots when they are full and, for every port with
    rows, before each `tick(clock)`: once per TICK_NS of capture time, on the clock of the
    record that crosses it (the packets before that record are metered first, as the live
    worker does on the wall clock).
    """

    def __init__(self, width: int, vni: int | None, feed: Callable[[_Slots], None],
                 tick: Callable[[int], None], batch_rows: int | None = None) -> None:
        if batch_rows is None:  # 16384 rows of 192 bytes; fewer, wider rows with --packets
            batch_rows = max(1024, min(16384, SLAB_BYTES // width))
        self.slots = [_Slots(port, width, batch_rows) for port in PORTS]
        self.by_port = dict(zip(PORTS, self.slots))
        self.no_vni = vni is None
        self.vxlan_header = _VXLAN_NO_VNI if vni is None else (
            b"\x08\0\0\0" + vni.to_bytes(3, "big") + b"\0")
        self.clock = 0
        self.next_tick: int | None = None  # the capture time at which flows are next expired
        self._feed, self._tick = feed, tick

    def feed(self, slots: _Slots) -> None:
        self._feed(slots)
        slots.rows = 0

    def feed_all(self) -> None:
        for slots in self.slots:
            if slots.rows:
                self.feed(slots)

    def tick(self) -> None:
        self.feed_all()
        self._tick(self.clock)


def _timestamp_error(path, record: Record) -> CaptureError:
    """A record whose time no int64 of nanoseconds holds (a pcapng if_tsresol/if_tsoffset
    gone wild): refused, rather than wrapped or clamped into a wrong time."""
    return CaptureError(os.fsdecode(path), record.offset,
                        f"record {record.index + 1} at offset {record.offset} has a timestamp "
                        "outside what 64-bit nanoseconds hold (years 1677 to 2262)")


def _walk_records(path, batches: _Batches, result: IngestResult,
                  progress: Callable[[int], None] | None) -> int:
    """The reference path: `read_capture` record by record, `_route` each. Returns the offset
    up to which `progress` was told."""
    last_offset = 0
    for record in read_capture(path):
        ts = record.timestamp_ns
        if not _INT64_MIN <= ts <= _INT64_MAX:
            raise _timestamp_error(path, record)
        result.records += 1
        if ts > batches.clock:
            batches.clock = ts
        if batches.next_tick is None:
            batches.next_tick = batches.clock + TICK_NS
        elif batches.clock >= batches.next_tick:
            batches.tick()
            batches.next_tick = batches.clock + TICK_NS
        full = _route(record, batches.by_port, batches.vxlan_header, batches.no_vni, result)
        if full is not None:
            batches.feed(full)
        if progress is not None and record.offset - last_offset >= 1 << 20:
            progress(record.offset - last_offset)
            last_offset = record.offset
    return last_offset


_PAUSE_BYTES = 4 << 20  # the compiled walker returns this often, to report progress
_RELEASE_BYTES = 16 << 20  # mapped pages read are given back in steps of this many bytes


def _walk_compiled(fast, path, batches: _Batches, result: IngestResult,
                   progress: Callable[[int], None] | None, *,
                   pause_bytes: int = _PAUSE_BYTES) -> int | None:
    """The same walk by `collector._fastcapture` over the file mapped in memory; None (and
    nothing done) when the file cannot be mapped: empty, or not a regular file (a pipe).

    A file that another process truncates while it is mapped loses its pages past the new
    end: the walker catches the SIGBUS that reading them raises and reports that record as
    cut (CaptureError, after what came before it was metered and written). Bytes past the
    new end inside its last page read as zeros, as a mapping gives them, so the record cut
    there is taken as it reads (the reference path, which reads instead of mapping, says it
    is cut). A file that grows is read up to its size when mapped."""
    # Decided before opening: a pipe can be opened (and read) only once.
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return None
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
    try:
        _advise(data, "MADV_SEQUENTIAL")
        walker = fast.Walker(data, tuple((s.buf, s.lengths, s.present, s.ts, s.no_vni)
                                         for s in batches.slots),
                             batches.vxlan_header, batches.no_vni)
        try:
            return _run_walker(walker, os.fsdecode(path), data, batches, progress, pause_bytes)
        finally:
            result.records += walker.records
            result.mirror_datagrams += walker.mirror_datagrams
            result.plain_packets += walker.plain_packets
            result.skipped += walker.skipped
            walker.close()
    finally:
        data.close()


def _run_walker(walker, name: str, data: mmap.mmap, batches: _Batches,
                progress: Callable[[int], None] | None, pause_bytes: int) -> int:
    from collector._fastcapture import DONE, ERROR, FULL, PAUSE, TICK

    slots = batches.slots
    walker.rows = tuple(s.rows for s in slots)
    walker.clock, walker.next_tick = batches.clock, batches.next_tick
    last_offset = released = 0
    try:
        while True:
            status = walker.run(walker.offset + pause_bytes)
            for s, rows in zip(slots, walker.rows):
                s.rows = rows
            if status == FULL:
                batches.feed(slots[walker.full_port])
            elif status == TICK:
                batches.clock = walker.clock
                batches.tick()
            elif status == ERROR:
                offset, detail = walker.error
                raise CaptureError(name, offset, detail)
            offset = walker.offset
            if progress is not None and offset - last_offset >= 1 << 20:
                progress(offset - last_offset)
                last_offset = offset
            if offset - released >= 2 * _RELEASE_BYTES:
                # Pages of the file already walked leave this process (they stay in the page
                # cache): resident memory stays bounded whatever the file's size.
                upto = (offset - _RELEASE_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
                _advise(data, "MADV_DONTNEED", released, upto - released)
                released = upto
            if status == DONE:
                return last_offset
            if status not in (FULL, TICK, PAUSE):
                raise AssertionError(f"collector._fastcapture: unknown status {status}")
            walker.rows = tuple(s.rows for s in slots)
    finally:
        for s, rows in zip(slots, walker.rows):
            s.rows = rows
        batches.clock, batches.next_tick = walker.clock, walker.next_tick


def _advise(data: mmap.mmap, advice: str, *where: int) -> None:
    """mmap.madvise(mmap.<advice>, ...) where the platform has both: a hint, never needed for
    correctness."""
    option = getattr(mmap, advice, None)
    if option is None or not hasattr(data, "madvise"):
        return
    try:
        data.madvise(option, *where)
    except OSError:
        pass


def _route(record: Record, slots: dict[int, _Slots], vxlan_header: bytes, no_vni: bool,
           result: IngestResult) -> _Slots | None:
    """Put the record in its port's batch; return the batch when it is full."""
    outer = outer_datagram(record.linktype, record.data)
    if outer is not None:
        result.mirror_datagrams += 1
        batch = slots[outer.port]
        # The copy AWS sent had payload_len bytes; a capture snaplen may hold fewer. As in
        # `collector decode`, lengths (captured_len, truncated) describe the copy AWS sent;
        # fields the snaplen cut are NULL. A plain packet (below) is its own copy: its
        # lengths are the capture's.
        full = batch.add(outer.payload, outer.payload_len, record.timestamp_ns)
        return batch if full else None
    located = link_layer(record.linktype, record.data)
    if located is None:
        result.skipped += 1
        return None
    result.plain_packets += 1
    ethertype, l3 = located
    if record.linktype == 1:  # Ethernet already: the frame goes as it is
        frame = record.data
    else:
        frame = _ETHERNET_PAD + ethertype.to_bytes(2, "big") + bytes(record.data[l3:])
    batch = slots[VXLAN_PORT]
    full = batch.add(vxlan_header + frame, 8 + len(frame), record.timestamp_ns, no_vni)
    return batch if full else None


def _feed(pipeline: Pipeline, slots: _Slots) -> None:
    rows = slots.rows
    buf, lengths, ts = slots.buf[:rows], slots.lengths[:rows], slots.ts[:rows]
    # Pipeline.feed's decoder (compiled or not, as the pipeline runs), split from metering so
    # that plain packets can lose the VNI their synthesised VXLAN header had to carry.
    decode = fast.decode_batch if pipeline.compiled else decode_batch
    batch = decode(buf, lengths, slots.port, slots.present[:rows])
    if slots.no_vni[:rows].any():
        batch.vni[slots.no_vni[:rows]] = -1  # a plain packet of a capture without --vni
    pipeline.feed_decoded(batch, ts, buf, lengths, slots.present[:rows])
