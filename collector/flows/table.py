"""The flow table: bidirectional flows from decoded packets, with explicit timestamps.

Sans-I/O: `add_batch` / `add` take packets and their capture or receive timestamps (ns),
`expire(now_ns)` takes the clock the caller trusts; both return the flows that ended. Nothing
here reads a clock, a socket or a file.

Keys. A flow is (VNI, VLAN ids, ethertype, IP version, protocol, unordered pair of
endpoints), an endpoint being (address, port). The VNI is in the key: a conversation mirrored
from both of its ENIs arrives under two VNIs and stays two flows. A field the copy did not
carry (a 25-byte copy has no addresses) is None in the key, so such packets are still counted,
in a flow whose unknown fields are NULL. Non-IP frames (ARP) are flows of their ethertype.

Direction. Counters are kept per endpoint ("a" is the lower endpoint of the key); which one is
the initiator is decided when the flow is exported: the sender of a TCP SYN without ACK when
one was seen, whatever order packets arrived in (NLB and GWLB reorder), else the sender of the
earliest packet.

ICMP. Type and code go in the port fields the way Community ID v1 does it: for a message with
a counterpart (echo 8 / reply 0, and so on) the ports are (type, counterpart type), so request
and reply form one flow; for others (unreachable...) they are (type, code).

Fragments. A non-first fragment has no ports; it joins the flow of its first fragment (same
addresses, protocol and IP ID / IPv6 fragment identification) when that was seen within
`fragment_timeout`, else it is counted with NULL ports.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from collector.decode.batch import PacketBatch
from collector.decode.packet import Packet
from collector.flows.community_id import ICMP4_COUNTERPART, ICMP6_COUNTERPART

ICMP, ICMPV6, TCP = 1, 58, 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
NS = 1_000_000_000
# "flush": ended on request (`collector serve --control`, POST /flush), for tests and tools
END_REASONS = ("idle", "active", "fin", "rst", "evicted", "shutdown", "flush")



@dataclass(frozen=True, slots=True)
class FlowConfig:
    idle_timeout: float = 60.0  # seconds without a packet
    active_timeout: float = 60.0  # a flow longer than this is exported in pieces (VPC Flow Logs)
    close_linger: float = 2.0  # after RST / FIN both ways, for stragglers and the last ACK
    max_flows: int = 1_000_000  # past it the least recently seen flows are exported early
    fragment_timeout: float = 30.0  # how long a first fragment's ports are remembered
    max_fragments: int = 100_000

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "active_timeout", "close_linger", "fragment_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        for name in ("max_flows", "max_fragments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class _Side:
    """Counters of one endpoint's packets."""

    __slots__ = ("packets", "bytes", "captured", "truncated", "flags", "first_ns")

    def __init__(self) -> None:
        self.packets = self.bytes = self.captured = self.truncated = self.flags = 0
        self.first_ns: int | None = None


class Flow:
    """A flow being metered. `key` = (vni, vlan, inner_vlan, ethertype, ip_version,
    protocol, addr_a, port_a, addr_b, port_b); addresses are 4 or 16 bytes."""

    __slots__ = ("key", "first_ns", "last_ns", "a", "b", "syn_from", "initiator", "fin_a",
                 "fin_b", "end_reason", "closing_since", "generation")

    def __init__(self, key: tuple, ts_ns: int, generation: int) -> None:
        self.key = key
        # first_ns: of the piece being counted (None after a checkpoint until the next packet);
        # last_ns: of the flow, for the idle timeout
        self.first_ns: int | None = ts_ns
        self.last_ns = ts_ns
        self.a, self.b = _Side(), _Side()
        self.syn_from: str | None = None  # "a" or "b": who sent the first SYN without ACK
        # "a" or "b", fixed by the first checkpoint: later pieces keep that orientation
        # whoever speaks in them
        self.initiator: str | None = None
        self.fin_a = self.fin_b = False
        self.end_reason: str | None = None  # set by RST / FIN both ways
        self.closing_since: int | None = None
        self.generation = generation

    def initiator_is_a(self) -> bool:
        if self.syn_from is not None:
            return self.syn_from == "a"
        if self.initiator is not None:
            return self.initiator == "a"
        if self.b.first_ns is None:
            return True
        if self.a.first_ns is None:
            return False
        return self.a.first_ns <= self.b.first_ns


@dataclass(frozen=True, slots=True)
class EndedFlow:
    """A flow as exported: oriented from its initiator (src) to its responder (dst)."""

    vni: int | None
    vlan_id: int | None
    inner_vlan_id: int | None
    ethertype: int | None
    ip_version: int | None
    protocol: int | None
    src_addr: bytes | None
    dst_addr: bytes | None
    src_port: int | None
    dst_port: int | None
    first_seen_ns: int
    last_seen_ns: int
    packets: int
    bytes: int
    captured_bytes: int
    truncated_packets: int
    tcp_flags: int
    rev_packets: int
    rev_bytes: int
    rev_captured_bytes: int
    rev_truncated_packets: int
    rev_tcp_flags: int
    end_reason: str


def _export(flow: Flow, reason: str) -> EndedFlow:
    vni, vlan, inner_vlan, ethertype, version, proto, addr_a, port_a, addr_b, port_b = flow.key
    fwd, rev = (flow.a, flow.b) if flow.initiator_is_a() else (flow.b, flow.a)
    src, sport, dst, dport = ((addr_a, port_a, addr_b, port_b) if fwd is flow.a
                              else (addr_b, port_b, addr_a, port_a))
    return EndedFlow(
        vni, vlan, inner_vlan, ethertype, version, proto, src, dst, sport, dport, flow.first_ns,
        flow.last_ns, fwd.packets, fwd.bytes, fwd.captured, fwd.truncated, fwd.flags,
        rev.packets, rev.bytes, rev.captured, rev.truncated, rev.flags, reason,
    )


def icmp_ports(version: int | None, icmp_type: int | None, icmp_code: int | None):
    """Community ID v1's ICMP port convention: (type, counterpart) or (type, code)."""
    if icmp_type is None:
        return None, None
    pairs = ICMP6_COUNTERPART if version == 6 else ICMP4_COUNTERPART
    if icmp_type in pairs:
        return icmp_type, pairs[icmp_type]
    return icmp_type, icmp_code


class FlowTable:
    """Bidirectional flow metering with idle, active, close and capacity expiry."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        self.config = config or FlowConfig()
        self._idle_ns = int(self.config.idle_timeout * NS)
        self._active_ns = int(self.config.active_timeout * NS)
        self._linger_ns = int(self.config.close_linger * NS)
        self._fragment_ns = int(self.config.fragment_timeout * NS)
        self._flows: OrderedDict[tuple, Flow] = OrderedDict()  # least recently seen first
        self._deadlines: list[tuple[int, int, tuple]] = []  # (active deadline, generation, key)
        self._fragments: OrderedDict[tuple, tuple[int, int, int]] = OrderedDict()
        self._generation = 0
        self.packets = 0
        self.exported = dict.fromkeys(END_REASONS, 0)

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def evicted(self) -> int:
        return self.exported["evicted"]

    # -- input ----------------------------------------------------------------------------

    def add(self, pkt: Packet, ts_ns: int) -> list[EndedFlow]:
        """Meter one decoded packet (the reference decoder's view) seen at `ts_ns`."""
        sport, dport = pkt.src_port, pkt.dst_port
        if pkt.ip_proto in (ICMP, ICMPV6):
            sport, dport = icmp_ports(pkt.ip_version, pkt.icmp_type, pkt.icmp_code)
        vlans = pkt.vlans + (None, None)
        return self._meter(
            ts_ns, pkt.vni, vlans[0], vlans[1], pkt.ethertype, pkt.ip_version, pkt.ip_proto, pkt.src_addr,
            pkt.dst_addr, sport, dport, pkt.wire_len, pkt.captured_len, pkt.l3_offset,
            pkt.truncated, pkt.tcp_flags, pkt.frag_offset, pkt.more_fragments, pkt.ip_id,
        )

    def add_batch(self, batch: PacketBatch, ts_ns) -> list[EndedFlow]:
        """Meter the decoded rows of `batch` (malformed rows are skipped: count them from
        `batch.reason`), row i seen at ts_ns[i]."""
        rows = np.flatnonzero(batch.reason == 0)
        if len(rows) == 0:
            return []
        columns = _batch_columns(batch, rows, np.asarray(ts_ns, dtype=np.int64)[rows])
        ended: list[EndedFlow] = []
        meter = self._meter
        for values in zip(*columns):
            ended.extend(meter(*values))
        return ended

    def _meter(self, ts, vni, vlan, inner_vlan, ethertype, version, proto, src, dst, sport, dport,
               wire_len, captured_len, l3_offset, truncated, flags, frag_offset, more, ip_id):
        self.packets += 1
        ended: list[EndedFlow] = []
        if frag_offset:  # a later fragment: its ports are those of the first, if seen
            ports = self._fragments.get((vni, vlan, version, proto, src, dst, ip_id))
            if ports is not None and ts - ports[2] <= self._fragment_ns:
                sport, dport = ports[0], ports[1]
        elif more and src is not None and dst is not None:
            self._remember_fragment((vni, vlan, version, proto, src, dst, ip_id), sport, dport, ts)
        # unknown fields sort first, so a copy without addresses is one endpoint
        end_1 = (src or b"", -1 if sport is None else sport)
        end_2 = (dst or b"", -1 if dport is None else dport)
        if end_1 <= end_2:
            key, from_a = (vni, vlan, inner_vlan, ethertype, version, proto, src, sport, dst, dport), True
        else:
            key, from_a = (vni, vlan, inner_vlan, ethertype, version, proto, dst, dport, src, sport), False
        flow = self._flows.get(key)
        if flow is not None:
            # The flow may have ended before this packet, whatever the clock ticks said: the
            # same packets give the same rows live (ticked every poll) and offline.
            reason = self._ended_by(flow, ts)
            if reason is not None:
                ended.extend(self._end(key, flow, reason))
                flow = None
            else:
                self._flows.move_to_end(key)
        if flow is None:
            flow = self._start(key, ts, ended)
        # Bytes are the IP-layer wire length. A copy cut before its length field counts the
        # IP bytes it holds (a lower bound; it is counted truncated too); a non-IP frame, its
        # captured length.
        if wire_len is not None:
            ip_bytes = wire_len
        elif l3_offset is not None:
            ip_bytes = max(0, captured_len - l3_offset)
        else:
            ip_bytes = captured_len
        side = flow.a if from_a else flow.b
        side.packets += 1
        side.bytes += ip_bytes
        side.captured += captured_len
        side.truncated += truncated
        if side.first_ns is None or ts < side.first_ns:
            side.first_ns = ts
        if flow.first_ns is None or ts < flow.first_ns:
            flow.first_ns = ts
        if ts > flow.last_ns:
            flow.last_ns = ts
        if flags is not None and proto == TCP:
            side.flags |= flags
            self._tcp_state(flow, from_a, flags, ts)
        return ended

    def _ended_by(self, flow: Flow, ts: int) -> str | None:
        """Why `flow` had ended by `ts` (a packet's time), or None if it goes on."""
        quiet = ts - flow.last_ns
        if flow.end_reason is not None:
            return flow.end_reason if quiet >= self._linger_ns else None
        if quiet >= self._idle_ns:
            return "idle"
        if flow.first_ns is not None and ts - flow.first_ns >= self._active_ns:
            return "active"
        return None

    def _tcp_state(self, flow: Flow, from_a: bool, flags: int, ts: int) -> None:
        if flags & TCP_SYN and not flags & TCP_ACK and flow.syn_from is None:
            flow.syn_from = "a" if from_a else "b"
        if flags & TCP_RST:
            if flow.end_reason is None:
                flow.end_reason, flow.closing_since = "rst", ts
        elif flags & TCP_FIN:
            if from_a:
                flow.fin_a = True
            else:
                flow.fin_b = True
            if flow.fin_a and flow.fin_b and flow.end_reason is None:
                flow.end_reason, flow.closing_since = "fin", ts

    def _start(self, key: tuple, ts: int, ended: list[EndedFlow]) -> Flow:
        while len(self._flows) >= self.config.max_flows:
            old_key, old = next(iter(self._flows.items()))
            ended.extend(self._end(old_key, old, "evicted"))
        self._generation += 1
        flow = Flow(key, ts, self._generation)
        self._flows[key] = flow
        heapq.heappush(self._deadlines, (ts + self._active_ns, self._generation, key))
        return flow

    def _end(self, key: tuple, flow: Flow, reason: str) -> list[EndedFlow]:
        """Remove the flow; the row of its last piece, none when a checkpoint exported
        everything it counted."""
        del self._flows[key]
        return self._piece(flow, reason)

    def _piece(self, flow: Flow, reason: str) -> list[EndedFlow]:
        if flow.first_ns is None:  # no packet since the last checkpoint
            return []
        self.exported[reason] += 1
        return [_export(flow, reason)]

    def _remember_fragment(self, frag_key: tuple, sport, dport, ts: int) -> None:
        self._fragments[frag_key] = (sport, dport, ts)
        self._fragments.move_to_end(frag_key)
        while len(self._fragments) > self.config.max_fragments:
            self._fragments.popitem(last=False)

    # -- time -----------------------------------------------------------------------------

    def expire(self, now_ns: int) -> list[EndedFlow]:
        """Export the flows that have ended by `now_ns`: idle, past their active timeout, or
        closed (RST, FIN both ways) and quiet for `close_linger`."""
        # Least recently seen first: stop at the first flow seen recently. Arrival order and
        # timestamps agree except for reordering within milliseconds.
        due = []
        quiet_enough = min(self._idle_ns, self._linger_ns)
        for key, flow in self._flows.items():
            quiet = now_ns - flow.last_ns
            if quiet < quiet_enough:
                break
            if flow.end_reason is not None and quiet >= self._linger_ns:
                due.append((key, flow, flow.end_reason))
            elif quiet >= self._idle_ns:
                due.append((key, flow, "idle"))
        ended = [row for key, flow, reason in due for row in self._end(key, flow, reason)]
        while self._deadlines and self._deadlines[0][0] <= now_ns:
            _, generation, key = heapq.heappop(self._deadlines)
            flow = self._flows.get(key)
            if flow is not None and flow.generation == generation:
                ended.extend(self._end(key, flow, flow.end_reason or "active"))
        horizon = now_ns - self._fragment_ns
        while self._fragments and next(iter(self._fragments.values()))[2] < horizon:
            self._fragments.popitem(last=False)
        return ended

    def snapshot(self, reason: str = "shutdown") -> list[EndedFlow]:
        """A row for every open flow's piece so far (closed ones with their close reason),
        least recently seen first; the flows go on untouched and nothing counts as exported.
        The journal keeps these so that a killed worker's successor can write them."""
        return [_export(flow, flow.end_reason or reason)
                for flow in self._flows.values() if flow.first_ns is not None]

    def checkpoint(self) -> list[EndedFlow]:
        """The interim export: a row for every flow's piece counted since it started or since
        the last checkpoint ('active', or its close reason), least recently seen first; each
        flow then counts from zero and stays, with its TCP state and orientation, so that a
        long flow's counts reach the dataset every interval (`--interim-export`)."""
        ended: list[EndedFlow] = []
        for flow in self._flows.values():
            if flow.first_ns is None:
                continue
            ended.extend(self._piece(flow, flow.end_reason or "active"))
            if flow.initiator is None:
                flow.initiator = "a" if flow.initiator_is_a() else "b"
            flow.a, flow.b = _Side(), _Side()
            flow.first_ns = None
        return ended

    def drain(self, reason: str = "shutdown") -> list[EndedFlow]:
        """Export every flow (end of input or shutdown). Closed flows keep their reason."""
        ended = [row for key, flow in list(self._flows.items())
                 for row in self._end(key, flow, flow.end_reason or reason)]
        self._deadlines.clear()
        self._fragments.clear()
        return ended


def _batch_columns(batch: PacketBatch, rows: np.ndarray, ts: np.ndarray) -> list[list]:
    """The per-packet values `_meter` takes, as Python lists (one conversion per column)."""

    def optional(column: np.ndarray) -> list:
        values = column[rows]
        return [None if v < 0 else v for v in values.tolist()]

    version = optional(batch.ip_version)
    proto = optional(batch.ip_proto)
    sport, dport = optional(batch.src_port), optional(batch.dst_port)
    icmp_type, icmp_code = optional(batch.icmp_type), optional(batch.icmp_code)
    for i, p in enumerate(proto):
        if p == ICMP or p == ICMPV6:
            sport[i], dport[i] = icmp_ports(version[i], icmp_type[i], icmp_code[i])
    vlan_count = batch.vlan_count[rows].tolist()
    vlan = [v if n >= 1 else None for v, n in zip(batch.vlan[rows].tolist(), vlan_count)]
    inner = [v if n >= 2 else None for v, n in zip(batch.inner_vlan[rows].tolist(), vlan_count)]
    more = [None if v < 0 else bool(v) for v in batch.more_fragments[rows].tolist()]
    return [
        ts.tolist(), optional(batch.vni), vlan, inner, optional(batch.ethertype), version, proto,
        batch.addresses("src", rows), batch.addresses("dst", rows), sport, dport,
        optional(batch.wire_len),
        batch.captured_len[rows].tolist(), optional(batch.l3_offset),
        batch.truncated[rows].tolist(), optional(batch.tcp_flags),
        optional(batch.frag_offset), more, optional(batch.ip_id),
    ]
