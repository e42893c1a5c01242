"""decode -> flows -> store: the one path that live traffic, offline captures and replayed
test traffic all take.

The pipeline holds the flow table and the dataset writers. Its callers own the I/O on the
input side (sockets, capture files) and the clock: `feed` takes receive slots with their
timestamps, `tick(now_ns)` expires flows against the clock the caller trusts (the wall clock
live, the capture's own clock offline).

Two implementations of decode and flow metering sit behind it, with the same results: the
compiled one (`collector.flows.fast`, on `collector._fastflow`) when it is built, and the
pure-Python reference (`decode_batch`, `FlowTable`, `flows_batch`) otherwise or with
COLLECTOR_PURE_PYTHON=1. `compiled` says which one this pipeline runs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from collector.decode import VXLAN_PORT, PacketBatch, decode_batch
from collector.decode.batch import REASONS
from collector.flows import FlowConfig, FlowTable, fast
from collector.flows.table import END_REASONS, EndedFlow
from collector.sessions import SessionRegistry
from collector.store import arrow, journal
from collector.store.rows import flows_batch, packets_batch, sessions_batch
from collector.store.writer import DatasetWriter


# The compiled table's ended flows wait here up to this many rows or seconds, then become one
# Arrow batch: building one costs ~1 ms however few rows it has, and a capture's ingest ticks
# every slab (7% of a 1,000,000-packet ingest went to batches of a few flows each).
ENDED_BATCH_ROWS = 65_536
ENDED_BATCH_SECONDS = 1.0
# The end reasons open flows are journaled with: 'crash' is what they are if it is ever read.
_JOURNAL_REASONS = [journal.RECOVERED_REASON if reason == "shutdown" else reason
                    for reason in END_REASONS]
MAX_VNI_LABELS = 1024  # per worker: VNIs counted on their own in session_packets/bytes
OTHER_VNI = -2  # the key of every VNI past that bound that no session names (-1: no VNI)


@dataclass
class Counters:
    """What came in and what became of it. datagrams = decoded + sum(malformed)."""

    datagrams: int = 0
    bytes: int = 0
    decoded: int = 0
    malformed: Counter = field(default_factory=Counter)  # reason label -> datagrams
    truncated: int = 0  # decoded copies that hold less than the packet
    unknown_vni: int = 0  # decoded with a VNI that no loaded session has
    session_packets: Counter = field(default_factory=Counter)  # vni -> packets
    session_bytes: Counter = field(default_factory=Counter)  # vni -> IP wire bytes
    flows_exported: int = 0


class Pipeline:
    def __init__(self, data_dir: str | os.PathLike, *, collector_id: str, writer_id: str = "0",
                 registry: SessionRegistry | None = None, flow_config: FlowConfig | None = None,
                 flush_seconds: float = 10.0, max_rows: int = 1_000_000,
                 packets: bool = False, packet_bytes: int = 256,
                 journal: bool = False, interim_export: bool = False) -> None:
        if packet_bytes < 0:
            raise ValueError(f"packet_bytes must be >= 0, got {packet_bytes}")
        self.collector_id = collector_id
        self.registry = registry
        self.compiled = fast.available()
        self.flows = fast.FastFlowTable(flow_config) if self.compiled else FlowTable(flow_config)
        # Live only, every `flush_seconds` (offline ingest is simply run again):
        # - journal: the pending rows are written, then the journal is replaced by every open
        #   flow's counts so far (collector/store/journal.py); a worker killed by SIGKILL or
        #   the OOM killer then loses what arrived since, not every open flow's whole life
        #   (active_timeout + flush_seconds), and its successor writes the journal's rows;
        # - interim export: each open flow's counts so far become a row ('active') and the
        #   flow counts on from zero, so long flows show up in SQL within a flush interval.
        self.journal = journal
        self.interim_export = interim_export
        self.flush_seconds = flush_seconds
        self.data_dir = data_dir
        self._next_interval: float | None = None
        self.journal_error: str | None = None
        self._ended: list[fast.EndedFlows] = []
        self._ended_rows = 0
        self._ended_since = 0.0  # monotonic time the oldest of them came
        self.counters = Counters()
        options = dict(collector_id=collector_id, writer_id=writer_id, max_rows=max_rows,
                       flush_seconds=flush_seconds)
        self.flow_writer = DatasetWriter(data_dir, "flows", **options)
        self.packet_writer = DatasetWriter(data_dir, "packets", **options) if packets else None
        self.packet_bytes = packet_bytes
        if registry is not None and len(registry):
            sessions = DatasetWriter(data_dir, "sessions", **options)
            sessions.write(sessions_batch(registry, collector_id, time.time_ns()))
            sessions.close()

    def feed(self, buf: np.ndarray, lengths: np.ndarray, ts_ns: np.ndarray,
             port: int = VXLAN_PORT, *, present: np.ndarray | None = None) -> PacketBatch:
        """Decode and meter one batch of datagrams (row i of `buf`, lengths[i] bytes long,
        received at ts_ns[i]); returns the decoded batch. `present[i]`: the bytes of row i
        that are the datagram's when fewer than its length (see `decode_batch`)."""
        decode = fast.decode_batch if self.compiled else decode_batch
        batch = decode(buf, lengths, port, present)
        self.feed_decoded(batch, ts_ns, buf, lengths, present)
        return batch

    def feed_decoded(self, batch: PacketBatch, ts_ns, buf: np.ndarray | None = None,
                     lengths: np.ndarray | None = None, present: np.ndarray | None = None) -> None:
        ts_ns = np.asarray(ts_ns, dtype=np.int64)
        self._count(batch, lengths)
        self._emit(self.flows.add_batch(batch, ts_ns))
        if self.packet_writer is not None:
            self._write_packets(batch, ts_ns, buf, lengths, present)

    def tick(self, now_ns: int, wall: float | None = None) -> None:
        """Expire flows against `now_ns`; flush files whose age passed `flush_seconds`
        (by `wall`, monotonic seconds, default now)."""
        self._emit(self.flows.expire(now_ns))
        wall = time.monotonic() if wall is None else wall
        if self._ended and wall - self._ended_since >= ENDED_BATCH_SECONDS:
            self._write_ended()
        if self.journal or self.interim_export:
            if self._next_interval is None:
                self._next_interval = wall + self.flush_seconds
            elif wall >= self._next_interval:
                self._next_interval = wall + self.flush_seconds
                if self.interim_export:
                    self._emit(self.flows.checkpoint())
                self._write_ended()
                self.flow_writer.try_flush(wall)
                self._write_journal()
        self.flow_writer.tick(wall)
        if self.packet_writer is not None:
            self.packet_writer.tick(wall)

    def flush(self, reason: str = "flush") -> None:
        """Export every active flow now (`end_reason` = `reason`) and write every file: for
        tests and tools that need the data on disk while the appliance runs on."""
        self._emit(self.flows.drain(reason))
        self._write_ended()
        self.flow_writer.flush()
        if self.packet_writer is not None:
            self.packet_writer.flush()
        self._write_journal()

    def close(self, reason: str = "shutdown") -> None:
        """Export every flow and write everything pending: nothing accepted is lost."""
        self._emit(self.flows.drain(reason))
        self._write_ended()
        self.flow_writer.close()
        if self.packet_writer is not None:
            self.packet_writer.close()
        if self.journal:  # every flow is written
            journal.discard_journal(self.data_dir, self.collector_id, self.flow_writer.writer_id)

    def _write_journal(self) -> None:
        """Replace the journal by the open flows so far, once every pending row is in a
        file; while writes fail the old journal stays (its fence still holds)."""
        if not self.journal or self._ended or self.flow_writer.pending_rows:
            return
        # Open flows are journaled as 'crash'; closed ones keep their close reason. The
        # compiled table leaves Community IDs out (recovery computes them).
        snapshot = (self.flows.snapshot("shutdown", community_id=False) if self.compiled
                    else self.flows.snapshot("shutdown"))
        try:
            if not len(snapshot):  # no open flow: nothing to recover (and no empty file)
                journal.discard_journal(self.data_dir, self.collector_id,
                                        self.flow_writer.writer_id)
                self.journal_error = None
                return
            if self.compiled:
                rows = snapshot.record_batch(self.registry, self.collector_id)
                rows = rows.set_column(rows.schema.get_field_index("end_reason"), "end_reason",
                                       arrow.take_strings(_JOURNAL_REASONS, snapshot.reason))
            else:
                rows = flows_batch([replace(flow, end_reason=journal.RECOVERED_REASON)
                                    if flow.end_reason == "shutdown" else flow
                                    for flow in snapshot], self.registry, self.collector_id)
            journal.write_journal(self.data_dir, self.collector_id, self.flow_writer.writer_id,
                                  rows, self.flow_writer.sequence)
            self.journal_error = None
        except OSError as err:
            self.journal_error = f"{type(err).__name__}: {err}"

    def _emit(self, ended: list[EndedFlow] | fast.EndedFlows) -> None:
        if len(ended):
            self.counters.flows_exported += len(ended)
            if isinstance(ended, fast.EndedFlows):
                if not self._ended:
                    self._ended_since = time.monotonic()
                self._ended.append(ended)
                self._ended_rows += len(ended)
                if self._ended_rows >= ENDED_BATCH_ROWS:
                    self._write_ended()
            else:
                self.flow_writer.write(flows_batch(ended, self.registry, self.collector_id))

    @property
    def registry(self) -> SessionRegistry | None:
        return self._registry

    @registry.setter
    def registry(self, registry: SessionRegistry | None) -> None:
        """A new session map (SIGHUP): the flows that ended under the old one are written
        with its sessions first."""
        if getattr(self, "_ended", None):
            self._write_ended()
        self._registry = registry

    def _write_ended(self) -> None:
        """The compiled table's waiting ended flows to the writer, as one batch."""
        if self._ended:
            ended = fast.EndedFlows.concat(self._ended)
            self._ended, self._ended_rows = [], 0
            self.flow_writer.write(ended.record_batch(self.registry, self.collector_id))

    def _count(self, batch: PacketBatch, lengths) -> None:
        c = self.counters
        c.datagrams += len(batch)
        if lengths is not None:
            c.bytes += int(np.sum(lengths))
        if self.compiled:  # one C call: numpy's reductions were 15% of a receive batch
            reasons, truncated, groups = fast.batch_counts(batch, len(REASONS))
        else:
            reasons, truncated, groups = _batch_counts(batch)
        decoded = reasons[0]
        c.decoded += decoded
        if decoded < len(batch):
            c.malformed.update({REASONS[code].value: count
                                for code, count in enumerate(reasons) if code and count})
        c.truncated += truncated
        if not decoded:
            return
        for vni, packets, wire_bytes in groups:
            known = self.registry is not None and vni >= 0 and self.registry.lookup(vni) is not None
            if self.registry is not None and vni >= 0 and not known:
                c.unknown_vni += packets
            if not known and vni not in c.session_packets and len(c.session_packets) >= MAX_VNI_LABELS:
                # Anyone can send any of 2**24 VNIs: past the bound, VNIs no session names share
                # one label instead of growing memory and /metrics with every one (a hostile
                # sender made 450,000 labels in 600,000 datagrams).
                vni = OTHER_VNI
            c.session_packets[vni] += packets
            c.session_bytes[vni] += int(wire_bytes)

    def _write_packets(self, batch: PacketBatch, ts_ns, buf, lengths, present=None) -> None:
        """Rows of the packets table: each frame's first `packet_bytes` bytes that were
        received; a capture's snaplen (`present`) may have kept fewer than the datagram had,
        and the slot's bytes past it are not the datagram's."""
        rows = np.flatnonzero(batch.reason == 0)
        if len(rows) == 0:
            return
        if self.compiled:
            rows_batch = fast.packets_record_batch(batch, rows, ts_ns, buf, lengths,
                                                   self.packet_bytes, self.registry,
                                                   self.collector_id, present)
            if rows_batch is not None:
                self.packet_writer.write(rows_batch)
                return
        frames = []
        for i in rows.tolist():
            if buf is None:
                frames.append(b"")
                continue
            start = int(lengths[i]) - int(batch.captured_len[i])  # where the frame begins
            end = int(lengths[i]) if present is None else min(int(lengths[i]), int(present[i]))
            stop = min(start + self.packet_bytes, end, buf.shape[1])
            frames.append(buf[i, start:stop].tobytes() if stop > start else b"")
        self.packet_writer.write(
            packets_batch(batch, rows, ts_ns, frames, self.registry, self.collector_id))


def _batch_counts(batch: PacketBatch) -> tuple[list[int], int, list[tuple]]:
    """`fast.batch_counts` in numpy: rows per reason code, truncated decoded rows, and
    [(vni, decoded rows, IP wire bytes)] in VNI order (an unknown wire length counts 0)."""
    reasons = np.bincount(batch.reason, minlength=len(REASONS)).tolist()
    decoded = reasons[0]
    vni, wire, truncated = batch.vni, batch.wire_len, batch.truncated
    if decoded < len(batch):
        ok = batch.reason == 0
        vni, wire, truncated = vni[ok], wire[ok], truncated[ok]
    if not decoded:
        return reasons, int(np.count_nonzero(truncated)), []
    low, high = int(vni.min()), int(vni.max())
    if low == high:  # the bytes of the wire lengths known (-1: unknown counts 0)
        groups = [(low, decoded, int(wire.sum(dtype=np.int64)) + int(np.count_nonzero(wire < 0)))]
    else:
        vnis, counts = np.unique(vni, return_counts=True)
        wire = np.where(wire >= 0, wire, 0)
        sums = np.bincount(np.searchsorted(vnis, vni), weights=wire, minlength=len(vnis))
        groups = list(zip(vnis.tolist(), counts.tolist(), (int(s) for s in sums.tolist())))
    return reasons, int(np.count_nonzero(truncated)), groups


__all__ = ["Counters", "Pipeline", "REASONS"]
