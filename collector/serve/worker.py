"""One receive worker: its sockets in the SO_REUSEPORT groups, its own flow table and files.

The loop polls its sockets, receives a batch, feeds the same pipeline `ingest` uses, and ticks
the clock (flow expiry, file rotation). Every second it sends its counters to the supervisor,
which serves /metrics and /healthz from them. SIGTERM/SIGINT: stop receiving, drain what the
sockets already hold, export every flow (`shutdown`), write everything, exit 0. A new sessions
map comes from the supervisor (which loaded and checked it on SIGHUP) through `inbox`, so that
every worker uses the same map.

Clocks. Datagrams carry the kernel's receive time (SO_TIMESTAMPNS, the wall clock), and flows
keep those times; flows expire against the same clock (`ExpiryClock`), carried forward between
datagrams by the monotonic clock. File flushes and health ages use the monotonic clock only.
When the wall clock steps (set by hand, NTP stepping, a VM resumed), every active flow is
exported at once (end_reason 'flush') so that no row mixes times from both sides of the step.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from collector.decode import GENEVE_PORT, VXLAN_PORT
from collector.flows import FlowConfig
from collector.pipeline import Pipeline
from collector.serve.config import ServeConfig
from collector.serve.logs import RateLimited
from collector.serve.receiver import Receiver
from collector.store import journal
from collector.sessions import SessionRegistry

log = logging.getLogger("collector.serve")
POLL_MS = 200  # the loop runs at least this often without traffic: expiry, flushes, heartbeat
REPORT_SECONDS = 1.0
# The wall clock moving this much against the monotonic clock between two loop passes is a
# step: NTP slews at most 500 ppm (0.5 ms per second), never a second.
STEP_NS = 1_000_000_000


class ExpiryClock:
    """The "now" flows expire against: the receive timestamps' clock. Anchored at the newest
    timestamp of the last batch received and carried forward by the monotonic clock, so that
    expiry compares like with like (kernel stamps with kernel stamps) and does not drift when
    no datagram comes. `step` tells a wall-clock step, seen as the wall clock moving against
    the monotonic one; after a step the anchor is dropped until the next datagram."""

    def __init__(self, step_ns: int = STEP_NS) -> None:
        self.step_ns = step_ns
        self._anchor: tuple[int, int] | None = None  # (receive time ns, monotonic ns)
        self._offset: int | None = None  # wall - monotonic at the last `step`

    def received(self, newest_ns: int, monotonic_ns: int) -> None:
        self._anchor = (newest_ns, monotonic_ns)

    def now(self, wall_ns: int, monotonic_ns: int) -> int:
        if self._anchor is None:
            return wall_ns
        stamp, at = self._anchor
        return stamp + (monotonic_ns - at)

    def step(self, wall_ns: int, monotonic_ns: int) -> int:
        """The wall clock's step since the last call, in ns (negative: backwards); 0: none."""
        offset = wall_ns - monotonic_ns
        previous, self._offset = self._offset, offset
        if previous is None or abs(offset - previous) < self.step_ns:
            return 0
        self._anchor = None
        return offset - previous


@dataclass
class Listener:
    name: str  # "vxlan" | "geneve": the metric label
    port: int  # the encapsulation it decodes (4789 / 6081), whatever port it listens on
    sock: socket.socket


@dataclass
class Snapshot:
    """What a worker reports to the supervisor."""

    worker: int
    pid: int
    loop_at: float  # time.time() of the last loop pass
    loop_monotonic: float = 0.0  # time.monotonic() of it: ages survive wall-clock steps
    datagrams: dict = field(default_factory=dict)  # listener -> datagrams
    bytes: dict = field(default_factory=dict)  # listener -> bytes
    kernel_drops: dict = field(default_factory=dict)  # listener -> SO_RXQ_OVFL count
    decoded: int = 0
    malformed: dict = field(default_factory=dict)
    truncated: int = 0
    unknown_vni: int = 0
    session_packets: dict = field(default_factory=dict)
    session_bytes: dict = field(default_factory=dict)
    flows_active: int = 0
    flows_exported: dict = field(default_factory=dict)  # end reason -> flows
    files_written: int = 0
    rows_written: int = 0
    flush_seconds: float = 0.0
    flush_error: str | None = None
    rows_pending: int = 0  # rows waiting in memory for a write that works
    rows_dropped: dict = field(default_factory=dict)  # (table, reason) -> rows dropped
    clock_steps: int = 0
    flows_recovered: int = 0  # from killed workers' journals
    journal_error: str | None = None
    sessions_loaded: int = 0
    stopping: bool = False
    flushed: int = 0  # the last flush request (POST /flush) this worker completed


class Worker:
    def __init__(self, index: int, config: ServeConfig, listeners: list[Listener],
                 registry: SessionRegistry | None, report, inbox=lambda: None) -> None:
        self.index, self.config, self.listeners = index, config, listeners
        self.registry = registry
        self.report = report  # callable(Snapshot)
        self.inbox = inbox  # callable() -> a new SessionRegistry, ("flush", n), or None
        self.pipeline = Pipeline(
            config.data, collector_id=config.collector_id, writer_id=f"w{index}",
            registry=None, flow_config=FlowConfig(
                idle_timeout=config.idle_timeout, active_timeout=config.active_timeout,
                max_flows=config.max_flows),
            flush_seconds=config.flush_seconds, packets=config.packets,
            packet_bytes=config.packet_bytes, journal=config.journal,
            interim_export=config.interim_export)
        self.pipeline.registry = registry  # sessions are stored once, by the supervisor
        for writer in self._writers():
            writer.max_pending_bytes = config.max_pending_bytes
        self.clock = ExpiryClock()
        self.clock_steps = 0
        self._dropped_seen = 0
        self.receivers = {l.name: Receiver(l.sock, config.batch, config.slot_bytes)
                          for l in listeners}
        self.stop = False
        self.flushed = 0
        self.flush_error: str | None = None
        self._warn = RateLimited(log)
        self._malformed_seen = 0
        self.flows_recovered = 0
        self._recovery: threading.Thread | None = None

    def _start_recovery(self) -> None:
        """Claim the journals killed writers left (our writer's; worker 0 also takes those of
        writers this run no longer has: fewer workers than before) and write their flows
        (end_reason crash) in a thread: receiving starts at once, and our own journal goes
        under our writer's name from the first flush interval."""
        config = self.config
        writers = [f"w{self.index}"]
        if self.index == 0:
            writers += sorted(
                (w for w in journal.journals(config.data, config.collector_id)
                 if w.startswith("w") and w[1:].isdigit() and int(w[1:]) >= config.workers),
                key=lambda w: int(w[1:]))
        try:
            work = [(w, path) for w in writers
                    for path in journal.claim(config.data, config.collector_id, w)]
        except OSError as err:  # a read-only or vanished data directory: health says so
            log.error("worker %d: cannot claim the journals of killed writers in %s: %s",
                      self.index, config.data, err)
            return
        if work:
            self._recovery = threading.Thread(target=self._recover, args=(work,),
                                              name="journal-recovery", daemon=True)
            self._recovery.start()

    def _recover(self, work: list) -> None:
        """A failure (disk full) is retried every flush interval; a stop leaves the claimed
        journal for the next start, which writes the same files again."""
        store = None
        if self.config.store:
            try:
                from collector.store.objectstore import open_store
                store = open_store(self.config.store)
            except Exception as err:  # unreachable store: the spool alone is searched
                log.warning("worker %d: journal recovery cannot list %s (%s): files uploaded "
                            "and removed from the spool in the instant before the kill are "
                            "not checked", self.index, self.config.store, err)
        while work and not self.stop:
            writer_id, path = work[0]
            try:
                rows = journal.recover_claimed(path, self.config.data, self.config.collector_id,
                                               writer_id, store=store)
            except OSError as err:
                log.error("worker %d: writing the journal of killed writer %s failed, retrying "
                          "in %.0f s: %s", self.index, writer_id, self.config.flush_seconds, err)
                time.sleep(self.config.flush_seconds)
                continue
            work.pop(0)
            self.flows_recovered += rows
            if rows:
                log.warning("worker %d: wrote %d flows that killed writer %s had journaled "
                            "(end_reason crash; traffic since its last flush is lost)",
                            self.index, rows, writer_id)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor reloads, then tells us
        poller = select.poll()
        by_fd = {}
        for listener in self.listeners:
            poller.register(listener.sock.fileno(), select.POLLIN)
            by_fd[listener.sock.fileno()] = listener
        next_report = 0.0
        self._start_recovery()
        while not self.stop:
            try:
                ready = poller.poll(POLL_MS)
            except InterruptedError:
                ready = []
            if ready:
                self._check_clock()
            for fd, _ in ready:
                self._receive(by_fd[fd])
            message = self.inbox()
            if isinstance(message, SessionRegistry):
                self.registry = self.pipeline.registry = message
            elif isinstance(message, tuple) and message[0] == "flush":
                for listener in self.listeners:  # what already arrived is part of the flush
                    self._receive(listener)
                self._guard(self.pipeline.flush)
                self.flushed = message[1]
                next_report = 0.0  # tell the supervisor now
            self._tick()
            if time.monotonic() >= next_report:
                self.report(self.snapshot())
                next_report = time.monotonic() + REPORT_SECONDS
        self._drain()
        dropped = sum(w.stats.dropped_rows for w in self._writers())
        if dropped:
            log.error("worker %d: %d rows were dropped in all (writing to %s failed while more "
                      "than max_pending_bytes waited)", self.index, dropped, self.config.data)
        if self.flush_error:
            log.error("worker %d: stopped with rows not written to %s: %s", self.index,
                      self.config.data, self.flush_error)
            return 1
        return 0

    def _receive(self, listener: Listener) -> None:
        receiver = self.receivers[listener.name]
        # Several batches while the socket has data, but yield to the clock now and then.
        for _ in range(8):
            rows = receiver.receive(time.time_ns())
            if rows == 0:
                return
            self.clock.received(int(receiver.ts[:rows].max()), time.monotonic_ns())
            self._guard(self.pipeline.feed, receiver.buf[:rows], receiver.lengths[:rows],
                        receiver.ts[:rows], listener.port)
            self._warn_malformed(listener.name)
            if rows < len(receiver.lengths):
                return

    def _warn_malformed(self, listener: str) -> None:
        malformed = self.pipeline.counters.malformed
        total = sum(malformed.values())
        if total > self._malformed_seen:
            self._warn.warning("malformed", "worker %d: %d malformed datagrams on %s so far (%s)",
                               self.index, total, listener,
                               ", ".join(f"{k} {v}" for k, v in sorted(malformed.items())))
            self._malformed_seen = total

    def _tick(self) -> None:
        self._check_clock()
        self._guard(self.pipeline.tick, self.clock.now(time.time_ns(), time.monotonic_ns()))
        if self.pipeline.journal_error:
            self._warn.warning("journal", "worker %d: writing its flow journal to %s failed (%s): "
                               "a kill now loses more than a flush interval",
                               self.index, self.config.data, self.pipeline.journal_error)

    def _check_clock(self) -> None:
        """At a wall-clock step, export every active flow before any datagram stamped after
        the step joins a flow of datagrams stamped before it."""
        step = self.clock.step(time.time_ns(), time.monotonic_ns())
        if step:
            self.clock_steps += 1
            log.warning("worker %d: the wall clock stepped %+.3f s: exporting every active flow "
                        "(end_reason flush) so that no flow mixes times from both sides",
                        self.index, step / 1e9)
            self._guard(self.pipeline.flush)

    def _writers(self):
        return [w for w in (self.pipeline.flow_writer, self.pipeline.packet_writer) if w]

    def _guard(self, action, *args) -> None:
        """Run a pipeline step. A write error (disk full, directory gone) leaves the rows
        pending in the writer, which retries them at its next flush; it is logged when it
        starts and ends, reported to health, and receiving goes on."""
        try:
            action(*args)
        except OSError:
            pass  # the writer has kept the rows and recorded the error
        writers = self._writers()
        error = next((w.stats.last_error for w in writers if w.stats.last_error), None)
        if error and not self.flush_error:
            log.error("worker %d: writing to %s failed, rows kept for the next flush: %s",
                      self.index, self.config.data, error)
        elif self.flush_error and not error:
            log.info("worker %d: writing to %s works again", self.index, self.config.data)
        self.flush_error = error
        dropped = sum(w.stats.dropped_rows for w in writers)
        if dropped > self._dropped_seen:
            self._warn.warning("dropped", "worker %d: %d rows dropped so far: writing to %s "
                               "fails (%s) and the rows waiting passed max_pending_bytes (%d)",
                               self.index, dropped, self.config.data, error or "recovered",
                               self.config.max_pending_bytes)
            self._dropped_seen = dropped
        for writer in writers:
            # The serve loop runs for months: it never needs the list of files written.
            writer.stats.paths.clear()

    def _drain(self) -> None:
        """Receive what the sockets already hold, then export and write everything."""
        deadline = time.monotonic() + self.config.shutdown_timeout / 2
        for listener in self.listeners:
            while time.monotonic() < deadline:
                rows = self.receivers[listener.name].receive(time.time_ns())
                if rows == 0:
                    break
                receiver = self.receivers[listener.name]
                self._guard(self.pipeline.feed, receiver.buf[:rows], receiver.lengths[:rows],
                            receiver.ts[:rows], listener.port)
            listener.sock.close()
        self._guard(self.pipeline.close, "shutdown")
        if self._recovery is not None:  # what is not written by then stays claimed
            self._recovery.join(timeout=max(0.0, deadline + self.config.shutdown_timeout / 4
                                            - time.monotonic()))
        snapshot = self.snapshot()
        snapshot.stopping = True
        self.report(snapshot)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True

    def snapshot(self) -> Snapshot:
        c, flows = self.pipeline.counters, self.pipeline.flows
        stats = self.pipeline.flow_writer.stats
        writers = self._writers()
        return Snapshot(
            worker=self.index, pid=os.getpid(), loop_at=time.time(),
            loop_monotonic=time.monotonic(),
            rows_pending=sum(w.pending_rows for w in writers),
            rows_dropped={(w.table, reason): rows for w in writers
                          for reason, rows in w.stats.dropped.items()},
            clock_steps=self.clock_steps, flows_recovered=self.flows_recovered,
            journal_error=self.pipeline.journal_error,
            datagrams={n: r.datagrams for n, r in self.receivers.items()},
            bytes={n: r.bytes for n, r in self.receivers.items()},
            kernel_drops={n: r.kernel_drops for n, r in self.receivers.items()},
            decoded=c.decoded, malformed=dict(c.malformed), truncated=c.truncated,
            unknown_vni=c.unknown_vni, session_packets=dict(c.session_packets),
            session_bytes=dict(c.session_bytes), flows_active=len(flows),
            flows_exported=dict(flows.exported), files_written=stats.files,
            rows_written=stats.rows, flush_seconds=stats.last_flush_seconds,
            flush_error=self.flush_error, flushed=self.flushed,
            sessions_loaded=len(self.registry) if self.registry is not None else 0,
        )


def listener_ports() -> dict[str, int]:
    return {"vxlan": VXLAN_PORT, "geneve": GENEVE_PORT}
