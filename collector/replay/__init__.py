"""Replay captures to a mirroring target as AWS VPC Traffic Mirroring would send them.

    summary = replay(["capture.pcap"], "127.0.0.1:4789", ReplayOptions(vni=7159709))
    print(summary.format())

Each record of the captures becomes the datagram AWS would send for it (`encap`: Ethernet
inner frame, PacketLength truncation, VXLAN or GWLB GENEVE, the outer source port AWS's flow
hash would pick), optionally only when a Traffic Mirror filter would mirror it (`filter`), at
the capture's pace or a tcpreplay-style rate (`timing`), through UDP sockets bound to those
source ports (`sender`). `ReplaySummary.format()` prints what tcpreplay users know.

At top speed, a classic pcap of Ethernet frames replayed as VXLAN (no filter, no duration)
takes a batch path when the compiled `collector._fastio` is there: the records of the mapped
file are walked in C (`pcap_walk`), each frame's flow key and outer source port computed in C
(`flow_keys`, `source_ports`: the `Encapsulator`'s CRC-32 of the same hash key; frames off
the common case go to flow_of), the flows sent counted in a C hash set (`flows_seen`), and
the datagrams leave by sendmmsg as the VXLAN header plus a slice of the mapping, grouped by
socket within each batch of 16,384 (`group_by_fd`: runs of one socket, as long as every
conversation's datagrams keep their order; both directions of a UDP flow leave from two
ports). It sends the same bytes from the same ports, each port's and each conversation's in
the same order, and counts the same, as the per-record path (tests/replay/
test_replay_fast.py compares them); datagrams of different conversations may leave in
another order within a batch, as they may arrive in one.
`workers` > 1 splits the datagrams by outer source port over that many processes: each
flow still leaves from one process, in order; a worker skips another's records right
after their port is computed.

The modules are sans-I/O except `sender`; this one reads the captures and drives the clock.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from collector import compiled
from collector.build import TCP, UDP
from collector.capture import _PCAP_MAGICS, PCAP_HEADER_LEN, CaptureError, read_capture
from collector.replay.encap import ENCAPS, Encapsulator, Skip, check_packet_length, flow_of
from collector.replay.filter import FilterEvaluator
from collector.replay.sender import DEFAULT_POOL_SIZE, Sender, SendStats, Target, resolve_target
from collector.replay.timing import Bounds, Pace, Schedule, wire_bytes
from collector.sessions import MirrorFilter

__all__ = ["ReplayError", "ReplayOptions", "ReplayProgress", "ReplaySummary", "replay"]

PROGRESS_EVERY = 1024  # datagrams between progress reports
BATCH = 16384  # records per batch on the fast path (a multiple of PROGRESS_EVERY)
_TABLE_BYTES = 64 << 20  # the fast path's set of flow keys sent stays within this
_KEY_LEN = 40  # bytes per row of collector._fastio.flow_keys


class ReplayError(ValueError):
    """Options that cannot be replayed (the message says which and why)."""


@dataclass(frozen=True)
class ReplayOptions:
    """Everything `replay` needs besides the captures and the target.

    Session: `vni` (required unless `as_captured`), `packet_length` (None = whole packets),
    `encap` ("vxlan", or "geneve" as a GWLB endpoint target receives it), `as_captured` (re-send
    mirror datagrams found in the capture unchanged). Pace, one of: `multiplier` (default: the
    capture's timing, x1), `pps`, `mbps`, `topspeed`. Bounds: `loop` (0 = forever, needs
    `limit` or `duration`), `limit` (datagrams), `duration` (seconds). Filter: `mirror_filter`
    with the mirrored ENI's `sources` (networks or addresses) and `amazon_dns` addresses; with
    `dry_run` nothing is sent and the filter's counts are the result. `pool_size`: sockets
    bound to source ports (0 = one socket). `workers`: processes sharing the datagrams by
    outer source port (with --topspeed or the capture's timing; not with a limit).
    """

    vni: int | None = None
    packet_length: int | None = None
    encap: str = "vxlan"
    as_captured: bool = False
    multiplier: float | None = None
    pps: float | None = None
    mbps: float | None = None
    topspeed: bool = False
    loop: int = 1
    limit: int | None = None
    duration: float | None = None
    mirror_filter: MirrorFilter | None = None
    sources: tuple = ()
    amazon_dns: tuple[str, ...] = ()
    dry_run: bool = False
    pool_size: int = DEFAULT_POOL_SIZE
    gwlb_src: str = "10.0.1.10"  # the VXLAN packet inside GENEVE: from the source ENI ...
    gwlb_dst: str = "10.0.2.20"  # ... to the GWLB endpoint
    workers: int = 1

    def __post_init__(self) -> None:
        try:
            self.pace(), self.bounds()
            check_packet_length(self.packet_length)
        except ValueError as e:
            raise ReplayError(str(e)) from None
        if self.vni is not None and (type(self.vni) is not int or not 0 <= self.vni < 1 << 24):
            raise ReplayError(f"VNI {self.vni!r} outside 0-16777215")
        if self.vni is None and not self.as_captured:
            raise ReplayError("a VNI is needed to encapsulate the packets (the session's "
                              "VirtualNetworkId), unless re-sending mirror datagrams as captured")
        if self.encap not in ENCAPS:
            raise ReplayError(f"encapsulation {self.encap!r}: expected one of {', '.join(ENCAPS)}")
        if self.mirror_filter is not None and not self.sources:
            raise ReplayError("a filter needs the mirrored ENI's address: a source IP or CIDR")
        if self.mirror_filter is None and self.sources:
            raise ReplayError("source addresses only matter with a filter")
        if self.pool_size < 0:
            raise ReplayError(f"pool size {self.pool_size} is negative")
        if type(self.workers) is not int or self.workers < 1:
            raise ReplayError(f"workers {self.workers!r}: expected 1 or more")
        if self.workers > 1 and (self.pps is not None or self.mbps is not None):
            raise ReplayError("--workers paces each worker on its own: use --topspeed or the "
                              "capture's timing (--multiplier), not --pps or --mbps")
        if self.workers > 1 and self.limit is not None:
            raise ReplayError("--workers with --limit: the limit cannot be split between "
                              "workers exactly; use one worker")

    def pace(self) -> Pace:
        return Pace(self.multiplier, self.pps, self.mbps, self.topspeed)

    def bounds(self) -> Bounds:
        return Bounds(self.loop, self.limit, self.duration)


class ReplayProgress(NamedTuple):
    """Where a replay is, for a progress bar."""

    attempted: int  # datagrams sent or failed so far
    bytes_read: int  # capture bytes read so far, over all passes
    elapsed: float  # seconds since the start


@dataclass
class ReplaySummary:
    """What a replay did. `format()` gives tcpreplay's summary lines, then notes."""

    target: str
    packets: int = 0  # datagrams sent
    bytes: int = 0  # their wire bytes (Ethernet + IP + UDP + payload)
    seconds: float = 0.0
    flows: int = 0  # distinct (VNI, conversation) pairs among the datagrams attempted
    failed: int = 0
    truncated: int = 0  # datagrams whose frame was cut to the packet length
    retried: int = 0
    records: int = 0  # capture records read, over all passes
    passes: int = 0
    skipped: Counter = field(default_factory=Counter)  # records that gave no datagram, by why
    filtered: int = 0  # datagrams the filter did not mirror
    cut_by_capture: int = 0  # datagrams of records the capture's snaplen had cut
    other_port: Counter = field(default_factory=Counter)  # as captured for another UDP port
    stats: SendStats | None = None
    filter_table: str | None = None
    dry_run: bool = False
    stopped: str | None = None  # why the replay ended before its input did

    @property
    def attempted(self) -> int:
        return self.packets + self.failed

    def format(self) -> str:
        if self.dry_run:
            lines = [] if self.filter_table is None else [self.filter_table]
            lines.append(f"Dry run: {self.records} records, {self.packets} datagrams would be "
                         f"sent ({self.flows} flows); nothing was sent")
            return "\n".join(lines + self.notes())
        seconds = self.seconds
        bps = self.bytes / seconds if seconds > 0 else 0.0
        pps = self.packets / seconds if seconds > 0 else 0.0
        lines = [
            f"Actual: {self.packets} packets ({self.bytes} bytes) sent in {seconds:.2f} seconds",
            f"Rated: {bps:.1f} Bps, {bps * 8 / 1e6:.2f} Mbps, {pps:.2f} pps",
            f"Flows: {self.flows} flows",
            f"Statistics for network device: {self.target}",
            f"\t{'Successful packets:':<27}{self.packets}",
            f"\t{'Failed packets:':<27}{self.failed}",
            f"\t{'Truncated packets:':<27}{self.truncated}",
            f"\t{'Retried packets (ENOBUFS):':<27}{self.retried}",
        ]
        return "\n".join(lines + self.notes())

    def notes(self) -> list[str]:
        """Lines that explain anything a reader of the counters could not guess."""
        notes = []
        stats = self.stats
        if stats is not None and stats.errors:
            errors = ", ".join(f"{name} {count}" for name, count in sorted(stats.errors.items()))
            notes.append(f"Failed by error: {errors}")
        if stats is not None and stats.refused:
            notes.append(f"The target refused datagrams: {stats.refused} ICMP port unreachable "
                         f"reports (is anything listening on {self.target}?)")
        if stats is not None and stats.unbindable:
            notes.append(f"{len(stats.unbindable)} source ports could not be bound: their "
                         f"{stats.shared} datagrams went from one shared socket with another "
                         "source port")
        elif stats is not None and stats.shared:
            notes.append(f"{stats.shared} datagrams went from one shared socket, not from "
                         "their flow's source port")
        if stats is not None and stats.evicted:
            notes.append(f"{stats.evicted} source-port sockets were closed to stay within the "
                         "socket pool")
        for why, count in sorted(self.skipped.items()):
            notes.append(f"Skipped {count} records: {why}")
        if self.filtered and not self.dry_run:
            notes.append(f"{self.filtered} packets not sent: the filter does not mirror them")
        if self.cut_by_capture:
            notes.append(f"{self.cut_by_capture} packets were cut by the capture's snaplen: "
                         "sent as far as captured")
        for port, count in sorted(self.other_port.items()):
            notes.append(f"{count} datagrams captured to UDP {port} were sent to {self.target}")
        if self.stopped:
            notes.append(f"Stopped: {self.stopped}")
        return notes


def replay(paths: Sequence[str | os.PathLike], target: str | Target | None,
           options: ReplayOptions, *, progress: Callable[[ReplayProgress], None] | None = None,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> ReplaySummary:
    """Replay the captures at `paths` to `target` ("HOST:PORT"; None for a dry run).

    Raises `ReplayError` for an unusable target, `CaptureError` (file and offset) for a capture
    that cannot be read: what came before the fault was sent, and a note on the error says
    how much. Ctrl-C (KeyboardInterrupt) stops the replay and returns its summary. `progress`
    is called every `PROGRESS_EVERY` datagrams and at the end of each file.
    """
    if options.dry_run:
        return _dry_run(paths, target, options, progress)
    if target is None:
        raise ReplayError("a target HOST:PORT is needed, except for a dry run")
    if not isinstance(target, Target):
        try:
            target = resolve_target(target)
        except ValueError as e:
            raise ReplayError(str(e)) from None
    if options.workers > 1:
        return _replay_workers(paths, target, options, progress, clock)
    return _replay(paths, target, options, progress, clock, sleep)[0]


def _replay(paths, target: Target, options: ReplayOptions, progress, clock, sleep,
            share: tuple[int, int] | None = None) -> tuple[ReplaySummary, set]:
    """One process's replay; with `share` (index, count) only the datagrams whose outer
    source port is index modulo count. Returns the summary and the flows attempted."""
    run = _Run(paths, str(target), options, progress, clock, share)
    with Sender(target, pool_size=options.pool_size, sleep=sleep) as sender:
        run.summary.stats = sender.stats
        try:
            run.send_all(sender, target.port, target.family == socket.AF_INET6, sleep)
        except KeyboardInterrupt:  # Ctrl-C ends a replay as tcpreplay's does: with a summary
            run.summary.stopped = "interrupted"
        except CaptureError as e:
            run.finish(sender.stats)
            e.add_note(f"{run.summary.packets} packets were sent before it, "
                       f"{run.summary.failed} failed")
            raise
        finally:
            run.summary.seconds = clock() - run.start
    run.finish(sender.stats)
    return run.summary, run.flows


def _replay_workers(paths, target: Target, options: ReplayOptions, progress,
                    clock) -> ReplaySummary:
    """`options.workers` forked processes, each sending the flows of its share of outer
    source ports; their summaries added up (records and skips are counted once: every
    worker reads all of them)."""
    context = multiprocessing.get_context("fork")
    count, start = options.workers, clock()
    pipes, procs = [], []
    for index in range(count):
        receiving, sending = context.Pipe(duplex=False)
        proc = context.Process(target=_worker, args=(sending, paths, target, options,
                                                     (index, count)), daemon=True)
        proc.start()
        sending.close()
        pipes.append(receiving)
        procs.append(proc)
    results, interrupted = [], False
    for receiving in pipes:
        while True:
            try:
                results.append(receiving.recv())
                break
            except KeyboardInterrupt:  # the workers got it too: wait for their summaries
                interrupted = True
            except EOFError:
                results.append(("error", "a replay worker exited without a summary"))
                break
    for proc in procs:
        proc.join()
    for result in results:
        if result[0] == "capture":
            error = CaptureError(*result[1:4])
            for note in result[4]:
                error.add_note(note)
            raise error
        if result[0] == "error":
            raise ReplayError(result[1])
    summaries = [result[1] for result in results]
    total = _merge([s for s, _ in summaries], [f for _, f in summaries], str(target))
    total.seconds = clock() - start
    if interrupted and total.stopped is None:
        total.stopped = "interrupted"
    if progress is not None:
        progress(ReplayProgress(total.attempted, sum(os.path.getsize(p) for p in paths)
                                * max(total.passes, 1), total.seconds))
    return total


def _worker(conn, paths, target, options, share) -> None:
    try:
        result = ("ok", _replay(paths, target, options, None, time.monotonic, time.sleep,
                                share))
    except CaptureError as e:
        result = ("capture", e.path, e.offset, e.detail, getattr(e, "__notes__", []))
    except BaseException as e:  # noqa: BLE001 - reported by the parent, not lost
        result = ("error", f"replay worker {share[0]}: {type(e).__name__}: {e}")
    conn.send(result)
    conn.close()


def _merge(parts: list[ReplaySummary], flows: list[set], target: str) -> ReplaySummary:
    first = parts[0]
    total = ReplaySummary(target, records=first.records, passes=first.passes,
                          skipped=first.skipped, filtered=first.filtered,
                          filter_table=first.filter_table, stats=SendStats())
    stats = total.stats
    for part in parts:
        total.packets += part.packets
        total.bytes += part.bytes
        total.failed += part.failed
        total.truncated += part.truncated
        total.retried += part.retried
        total.cut_by_capture += part.cut_by_capture
        total.other_port.update(part.other_port)
        total.stopped = total.stopped or part.stopped
        if part.stats is not None:
            for name in ("sent", "failed", "retried", "refused", "ports_bound", "shared",
                         "evicted"):
                setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
            stats.errors.update(part.stats.errors)
            stats.unbindable |= part.stats.unbindable
    total.flows = len(set().union(*flows))
    return total


class _Run:
    """One replay's state: the encapsulator, filter, schedule, counters."""

    def __init__(self, paths, target: str, options: ReplayOptions, progress, clock,
                 share: tuple[int, int] | None = None) -> None:
        self.paths, self.options, self.progress, self.clock = list(paths), options, progress, clock
        self.share = share
        self.attempted = 0
        self._known_keys: _KnownKeys | None = None  # made by the batch path
        self.encapsulator = Encapsulator(
            vni=options.vni, packet_length=options.packet_length, encap=options.encap,
            as_captured=options.as_captured, gwlb_src=options.gwlb_src, gwlb_dst=options.gwlb_dst)
        self.evaluator = None
        if options.mirror_filter is not None:
            try:
                self.evaluator = FilterEvaluator(options.mirror_filter, options.sources,
                                                 options.amazon_dns)
            except ValueError as e:
                raise ReplayError(str(e)) from None
        self.summary = ReplaySummary(target, dry_run=options.dry_run)
        self.flows: set = set()
        self.bytes_read = 0
        self.start = clock()

    def datagrams(self, pass_files: Callable[[], None] | None = None,
                  paths: Sequence | None = None) -> Iterable:
        """(record, Mirrored) for every record of one pass (of `paths`, by default all) that
        gives a datagram the filter (if any) mirrors and that is this worker's share;
        `pass_files` is called at the start of each file."""
        summary, mirror, evaluator = self.summary, self.encapsulator.mirror, self.evaluator
        index, count = self.share or (0, 1)
        for path in self.paths if paths is None else paths:
            if pass_files is not None:
                pass_files()
            offset = records = 0
            try:
                for record in read_capture(path):
                    records += 1
                    offset = record.offset
                    mirrored = mirror(record)
                    if mirrored.__class__ is Skip:
                        summary.skipped[mirrored.value] += 1
                        continue
                    if evaluator is not None and not evaluator.tally(mirrored.flow).mirrored:
                        summary.filtered += 1
                        continue
                    if count > 1 and mirrored.source_port % count != index:
                        continue  # another worker's
                    yield record, mirrored
                offset = os.path.getsize(path)
            finally:
                summary.records += records
                self.bytes_read += offset
            self.report()

    def count(self, mirrored) -> None:
        summary = self.summary
        self.flows.add(mirrored.flow_key())
        summary.truncated += mirrored.truncated
        summary.cut_by_capture += mirrored.cut_by_capture

    def send_all(self, sender: Sender, port: int, ipv6: bool, sleep) -> None:
        """Every pass over the input, paced by the schedule, until the input or a bound ends.
        Each file goes by the batch path when it can (`_fast_file`), else record by record."""
        options, summary = self.options, self.summary
        bounds, schedule = options.bounds(), Schedule(options.pace())
        fast = self._fastio()
        for _ in bounds.passes():
            summary.passes += 1
            before = self.attempted
            for path in self.paths:
                mapped = None if fast is None else _classic_ethernet_pcap(path)
                if mapped is not None:
                    schedule.new_input()
                    with mapped:
                        stop = self._send_fast(fast, mapped, path, sender, ipv6, bounds)
                else:
                    stop = self._send_records([path], schedule, bounds, sender, port, ipv6,
                                              sleep)
                if stop:
                    return
            if self.attempted == before:  # every further pass would send nothing either
                if options.loop != 1:
                    summary.stopped = "a pass over the input had nothing to send"
                return

    def _fastio(self):
        """collector._fastio when this replay can take the batch path, else None."""
        options = self.options
        if (not options.topspeed or options.as_captured or options.encap != "vxlan"
                or self.evaluator is not None or options.duration is not None):
            return None
        return compiled.extension("_fastio")

    def _send_records(self, paths, schedule: Schedule, bounds: Bounds, sender: Sender,
                      port: int, ipv6: bool, sleep) -> bool:
        """The per-record path over `paths`; True when a bound stopped the replay.
        The per-datagram loop keeps its counters in locals (it runs a million times a
        minute); they are written to the summary at every progress report and at the end."""
        options, summary, clock = self.options, self.summary, self.clock
        paced, timed = not options.topspeed, bounds.duration is not None
        headers = wire_bytes(0, ipv6)
        send, remember = sender.send, self.flows.add
        start = self.start
        sent, sent_bytes = summary.packets, summary.bytes
        truncated, cut = summary.truncated, summary.cut_by_capture
        attempted = self.attempted

        def flush() -> None:
            summary.packets, summary.bytes = sent, sent_bytes
            summary.truncated, summary.cut_by_capture = truncated, cut
            self.attempted = attempted

        try:
            for record, mirrored in self.datagrams(schedule.new_input, paths):
                payload = mirrored.payload
                size = headers + len(payload)
                if paced:
                    due = schedule.due(record.timestamp_ns, size)
                    if bounds.beyond(due):  # it would go after the end: stop now
                        summary.stopped = self._why_stopped(bounds, attempted)
                        return True
                    wait = start + due - clock()
                    if wait > 0:
                        sleep(wait)
                if send(payload, mirrored.source_port):
                    sent += 1
                    sent_bytes += size
                attempted += 1
                remember((mirrored.vni, mirrored.conversation))
                truncated += mirrored.truncated
                cut += mirrored.cut_by_capture
                if options.as_captured and mirrored.port != port:
                    summary.other_port[mirrored.port] += 1
                if attempted % PROGRESS_EVERY == 0:
                    flush()
                    self.report()
                if bounds.reached(attempted, clock() - start if timed else 0.0):
                    summary.stopped = self._why_stopped(bounds, attempted)
                    return True
            return False
        finally:
            flush()

    def _send_fast(self, fast, data, path, sender: Sender, ipv6: bool, bounds: Bounds) -> bool:
        """The batch path over one mapped classic pcap of Ethernet frames (see the module
        docstring); True when the limit stopped the replay. Counts exactly as `_send_records`
        does: records, skips, flows, truncation, bytes."""
        summary, encapsulator = self.summary, self.encapsulator
        hashes, remember, vni = encapsulator._hashes, self.flows.add, encapsulator.vni
        header = encapsulator._vxlan
        headers = wire_bytes(0, ipv6) + len(header)
        keep_bytes = encapsulator.packet_length or (1 << 62)
        index, count = self.share or (0, 1)
        big = _PCAP_MAGICS[int.from_bytes(data[:4], "little")][0] == ">"
        offsets, caplens, wirelens, ports, flows = (np.empty(BATCH, np.int64) for _ in range(5))
        keys = np.empty((BATCH, _KEY_LEN), np.uint8)
        key_hashes = np.empty(BATCH, np.uint64)
        if self._known_keys is None:
            self._known_keys = _KnownKeys(fast)
        known = self._known_keys
        view = memoryview(data)
        pos = PCAP_HEADER_LEN
        reached = 0  # the offset of the last record read, as the per-record path keeps it
        try:
            while True:
                n, pos, status = fast.pcap_walk(data, pos, big, offsets, caplens, wirelens)
                if n == 0:
                    if status:  # a faulty record at `pos`: what came before it was sent
                        _raise_capture_error(path, pos)
                    return False
                off, cap, wire, port, flow = (offsets[:n], caplens[:n], wirelens[:n], ports[:n],
                                              flows[:n])
                usable = cap >= 14  # shorter: no Ethernet header (`ethernet_frame`)
                fast.flow_keys(data, off, cap, keys[:n], key_hashes[:n])
                # the outer source port in C for the common case (-1: ask flow_of), so that a
                # worker looks no further at the records of another worker's ports; and an
                # id of each frame's conversation, which sending keeps in order
                fast.source_ports(keys[:n], port, flow)
                simple = port >= 0
                conversations: dict = {}
                for i in np.flatnonzero(~simple & usable):  # VLAN tags, extension headers,
                    # cut headers, non-IP: flow_of per frame
                    port[i], conversations[i] = hashes(flow_of(view[off[i]:off[i] + cap[i]]))
                    flow[i] = hash(conversations[i])
                send = usable.copy()
                if count > 1:
                    send &= port % count == index
                used = n
                if bounds.limit is not None:
                    room = bounds.limit - self.attempted
                    sending = np.flatnonzero(send)
                    if len(sending) >= room:  # the limit falls in this batch: stop after it
                        used = int(sending[room - 1]) + 1 if room > 0 else 0
                        send[used:] = False
                        usable[used:] = False
                summary.records += used
                if short := int(used - usable[:used].sum()):
                    summary.skipped[Skip.LINK_TYPE.value] += short
                chosen = np.flatnonzero(send)
                lengths = np.minimum(cap[chosen], keep_bytes)
                failed = sender.send_batch(data, off[chosen], lengths, port[chosen], header,
                                           conversations=flow[chosen])
                for conversation in known.first_seen(keys, key_hashes, chosen[simple[chosen]]):
                    remember((vni, conversation))
                for i in chosen[~simple[chosen]]:
                    remember((vni, conversations[i]))
                summary.packets += len(chosen) - len(failed)
                summary.bytes += int((lengths + headers).sum() -
                                     (lengths[failed] + headers).sum())
                summary.truncated += int((cap[chosen] > keep_bytes).sum())
                summary.cut_by_capture += int((cap[chosen] < wire[chosen]).sum())
                self.attempted += len(chosen)
                if used:
                    reached = int(off[used - 1]) - 16
                if used < n:
                    summary.stopped = self._why_stopped(bounds, self.attempted)
                    return True
                if self.attempted and self.attempted % PROGRESS_EVERY < len(chosen):
                    self.report()
        finally:
            del view  # no export of the mapping may outlive it (it is closed next)
            self.bytes_read += len(data) if pos >= len(data) else reached
            self.report()

    @staticmethod
    def _why_stopped(bounds: Bounds, attempted: int) -> str:
        if bounds.limit is not None and attempted >= bounds.limit:
            return f"the limit of {bounds.limit} packets was reached"
        return f"the duration of {bounds.duration:g} s was over"

    def report(self) -> None:
        if self.progress is not None:
            summary = self.summary
            attempted = summary.packets + (0 if summary.stats is None else summary.stats.failed)
            self.progress(ReplayProgress(attempted, self.bytes_read, self.clock() - self.start))

    def finish(self, stats: SendStats | None) -> None:
        summary = self.summary
        summary.flows = len(self.flows)
        if stats is not None:
            summary.failed, summary.retried = stats.failed, stats.retried
        if self.evaluator is not None:
            summary.filter_table = self.evaluator.table()


class _KnownKeys:
    """The batch path's flows sent so far, by their flow keys (`collector._fastio.flow_keys`
    rows) in a hash set in C (`flows_seen`: open addressing over numpy arrays, keys compared
    whole, so a hash collision never merges two flows): which rows of a batch are of a flow
    not seen before. Only those get their conversation made (`_conversation`)."""

    _FIRST_SLOTS = 1 << 12

    def __init__(self, fast) -> None:
        self.fast = fast
        self.clear(self._FIRST_SLOTS)

    def clear(self, slots: int) -> None:
        self.hashes = np.zeros(slots, np.uint64)
        self.keys = np.zeros((slots, _KEY_LEN), np.uint8)
        self.stored = 0

    def first_seen(self, keys: np.ndarray, hashes: np.ndarray, rows: np.ndarray) -> list:
        """The conversations of the flows of `rows` (common-case rows of `keys`, being sent)
        not seen before."""
        rows = np.ascontiguousarray(rows, np.int64)
        fresh = np.empty(len(rows), np.int64)
        found = []
        while len(rows):
            new, self.stored, looked_at = self.fast.flows_seen(
                keys, hashes, rows, self.hashes, self.keys, fresh, self.stored)
            found.append(fresh[:new].copy())
            rows = rows[looked_at:]
            if len(rows):  # the table is 3/4 full: twice the slots, or start over
                self._grow()
        rows = keys[np.concatenate(found)].tobytes() if found else b""
        return [_conversation(rows[at:at + _KEY_LEN]) for at in range(0, len(rows), _KEY_LEN)]

    def _grow(self) -> None:
        held = np.flatnonzero(self.hashes)
        if 2 * len(self.hashes) * _KEY_LEN > _TABLE_BYTES:  # bounded: remember anew
            self.clear(len(self.hashes))
            return
        hashes, keys = self.hashes[held], self.keys[held]
        self.clear(2 * len(self.hashes))
        spare = np.empty(len(held), np.int64)
        self.fast.flows_seen(keys, hashes, np.arange(len(held)), self.hashes, self.keys, spare,
                             0)
        self.stored = len(held)


def _conversation(row: bytes) -> bytes:
    """`Flow.symmetric_key()` of a frame whose flow_keys row (common case) is `row`: what
    flow_of and the `Encapsulator` would give, without them."""
    size = 4 if row[0] == 4 else 16
    proto = row[1]
    a, b = row[6:6 + size], row[22:22 + size]
    if proto == TCP or proto == UDP:
        a, b = a + row[2:4], b + row[4:6]
    low, high = (a, b) if a <= b else (b, a)
    return b"S" + bytes((proto,)) + low + b"|" + high


def _classic_ethernet_pcap(path) -> mmap.mmap | None:
    """The file mapped when it is a classic pcap of Ethernet frames (the batch path's input),
    else None: the per-record reader then reads it. Its records are not walked here: the
    batch path meets a faulty one in its own walk and raises the reader's error for it."""
    try:
        with open(path, "rb") as f:
            # MAP_POPULATE: the pages mapped in one go, not one fault each as the walk
            # touches them
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            data = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    except (OSError, ValueError):  # empty, or not a regular file
        return None
    try:
        if len(data) < PCAP_HEADER_LEN:
            raise LookupError
        order, _ = _PCAP_MAGICS[int.from_bytes(data[:4], "little")]
        if int.from_bytes(data[20:24], "little" if order == "<" else "big") & 0xFFFF != 1:
            raise LookupError  # not LINKTYPE_ETHERNET
    except LookupError:
        data.close()
        return None
    return data


def _raise_capture_error(path, offset: int) -> None:
    """The error the per-record reader gives for the faulty record the batch path's walk
    met at `offset` (its records before were sent): read_capture says where and why."""
    for _ in read_capture(path):
        pass
    raise CaptureError(str(path), offset, f"record at offset {offset} cannot be read")


def _dry_run(paths, target, options: ReplayOptions, progress) -> ReplaySummary:
    """One pass over the input: what would be sent and what the filter decides; no socket,
    no pacing, no loop or limit."""
    run = _Run(paths, "-" if target is None else str(target), options, progress, time.monotonic)
    run.summary.passes = 1
    for _, mirrored in run.datagrams():
        run.count(mirrored)
        run.summary.packets += 1  # would be sent
    run.summary.seconds = time.monotonic() - run.start
    run.finish(None)
    return run.summary
