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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from collector.capture import Record, read_capture
from collector.decode import GENEVE_PORT, VXLAN_GPE_PORT, VXLAN_PORT, decode_batch
from collector.decode.outer import link_layer, outer_datagram
from collector.pipeline import Pipeline

BATCH_ROWS = 4096
TICK_NS = 1_000_000_000  # expire flows once per second of capture time
HEADER_SLOT = 192  # bytes of each datagram the decoder needs (GENEVE + GWLB options + headers)
_VXLAN_NO_VNI = b"\x08\x00\x00\x00\x00\x00\x00\x00"
_ETHERNET_PAD = b"\x00" * 12  # synthesised MAC addresses


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

    def __init__(self, port: int, width: int) -> None:
        self.port = port
        self.buf = np.zeros((BATCH_ROWS, width), dtype=np.uint8)
        self.lengths = np.zeros(BATCH_ROWS, dtype=np.int64)
        self.present = np.zeros(BATCH_ROWS, dtype=np.int64)  # bytes of the row that are data
        self.ts = np.zeros(BATCH_ROWS, dtype=np.int64)
        self.no_vni = np.zeros(BATCH_ROWS, dtype=bool)
        self.rows = 0

    def add(self, payload, length: int, ts: int, no_vni: bool = False) -> bool:
        """Add a datagram; True when the batch is full."""
        row, width = self.rows, self.buf.shape[1]
        head = payload[:width]
        self.buf[row, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        # A snaplen may have cut the datagram: `present` says where its bytes end in the row.
        self.present[row] = len(head)
        self.lengths[row], self.ts[row], self.no_vni[row] = length, ts, no_vni
        self.rows += 1
        return self.rows == BATCH_ROWS


def ingest(paths: Iterable[str | os.PathLike], pipeline: Pipeline, *, vni: int | None = None,
           progress: Callable[[int], None] | None = None) -> IngestResult:
    """Meter every packet of the captures at `paths` into `pipeline`, then close it.

    `progress(n)` is called with the bytes of capture read since its last call.
    """
    if vni is not None and not 0 <= vni < 1 << 24:
        raise ValueError(f"VNI {vni} outside 0..16777215")
    result = IngestResult()
    width = HEADER_SLOT + pipeline.packet_bytes if pipeline.packet_writer else HEADER_SLOT
    slots = {port: _Slots(port, width) for port in (VXLAN_PORT, VXLAN_GPE_PORT, GENEVE_PORT)}
    vxlan_header = _VXLAN_NO_VNI if vni is None else b"\x08\0\0\0" + vni.to_bytes(3, "big") + b"\0"
    clock = 0
    next_tick = None  # the capture time at which flows are next expired
    try:
        for path in paths:
            result.files += 1
            last_offset = 0
            for record in read_capture(path):
                result.records += 1
                clock = max(clock, record.timestamp_ns)
                if next_tick is None:
                    next_tick = clock + TICK_NS
                elif clock >= next_tick:
                    # Expire on the capture's clock, as the live worker does on the wall
                    # clock; the packets before this one are metered first.
                    _feed_all(pipeline, slots)
                    pipeline.tick(clock)
                    next_tick = clock + TICK_NS
                full = _route(record, slots, vxlan_header, vni is None, result)
                if full is not None:
                    _feed(pipeline, full)
                if progress is not None and record.offset - last_offset >= 1 << 20:
                    progress(record.offset - last_offset)
                    last_offset = record.offset
            size = Path(path).stat().st_size
            result.bytes_read += size
            if progress is not None:
                progress(size - last_offset)
    finally:
        # Whatever was read before an error is metered and written: nothing accepted is lost.
        _feed_all(pipeline, slots)
        pipeline.close(reason="shutdown")
        result.paths = list(pipeline.flow_writer.stats.paths)
    return result


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


def _feed_all(pipeline: Pipeline, slots: dict[int, _Slots]) -> None:
    for batch in slots.values():
        if batch.rows:
            _feed(pipeline, batch)


def _feed(pipeline: Pipeline, slots: _Slots) -> None:
    rows = slots.rows
    buf, lengths, ts = slots.buf[:rows], slots.lengths[:rows], slots.ts[:rows]
    batch = decode_batch(buf, lengths, slots.port, slots.present[:rows])
    if slots.no_vni[:rows].any():
        batch.vni[slots.no_vni[:rows]] = -1  # a plain packet of a capture without --vni
    pipeline.feed_decoded(batch, ts, buf, lengths)
    slots.rows = 0
