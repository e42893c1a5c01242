"""`collector replay` into a running `collector serve` meters what `collector ingest` meters.

Every capture of ../shared/pcaps (when present) and of fixtures/ is replayed into one
`collector serve --control` (`collector.testing.CollectorServer`, one worker) and ingested
through the library (`collector.ingest.ingest` into a `Pipeline`) with the same session
semantics; both datasets must hold the same flows (VNI, VLAN ids, ethertype, IP version,
protocol, endpoint pair) with the same packets and IP wire bytes, per direction.

- **Plain captures** (no mirror datagram in them) are replayed under a VNI of their own, for
  each packet length 25, 64, 128 and whole packets. The ingest side meets the same cut:
  each record becomes the Ethernet frame ingest makes of it (an Ethernet header synthesised
  for SLL, NULL and raw-IP records), cut to the packet length, in a capture of its own (a
  snaplen-cut plain packet is metered as a truncated copy: wire length from the IP header).
- **Appliance captures** (UDP 4789/6081 datagrams) are replayed as captured, once: their
  datagrams carry their own VNIs and were cut (or not) by whoever captured them, so a
  session's packet length does not apply to them. Several VNIs in one capture are compared
  per VNI (the VNI is part of the flow key).
- **Time is not compared.** A replay at full speed compresses the capture's time, so idle and
  active timeouts cut flows differently (a capture spanning days is one burst live) and
  first_seen differs: packets and bytes are summed per flow key over rows, and each
  direction is told by its endpoint rather than by the row's orientation.

Cases whose VNIs do not collide share a phase: replayed together, flushed once, their rows
told apart by VNI. Each phase's files are then moved out of the server's data directory into
a dataset of their own. The replays are paced (PPS) so that loopback does not drop; the
kernel drop counters must stay 0.
"""

from __future__ import annotations

import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from collector.capture import read_capture
from collector.decode.outer import link_layer, outer_datagram
from collector.ingest import ingest
from collector.pipeline import Pipeline
from collector.query import connect
from collector.testing import CollectorServer
from tests.pcaps import PCAPS_DIR, capture_files, capture_id, unavailable

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="collector serve needs Linux (SO_REUSEPORT, /proc)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PACKET_LENGTHS = (25, 64, 128, None)
PPS = 20_000  # paced: well within what one worker meters, so loopback never drops
FIRST_VNI = 9_000_000  # plain cases' VNIs: far from those the appliance captures carry
FLOW_COLUMNS = ("vni, vlan_id, inner_vlan_id, ethertype, ip_version, protocol, src_addr, "
                "src_port, dst_addr, dst_port, packets, bytes, rev_packets, rev_bytes")


# -- the cases ---------------------------------------------------------------------------------


def is_appliance_capture(path: Path) -> bool:
    """True when the capture holds mirror datagrams (UDP 4789/4790/6081)."""
    return any(outer_datagram(r.linktype, r.data) is not None for r in read_capture(path))


@dataclass(frozen=True)
class Case:
    path: Path
    name: str
    appliance: bool
    packet_length: int | None
    vni: int  # plain: the session's VNI; appliance: for records that are no mirror datagram

    @property
    def id(self) -> str:
        return f"{self.name}-{'as-captured' if self.appliance else self.packet_length or 'full'}"


def make_cases() -> list[Case]:
    paths = [(p, capture_id(p)) for p in capture_files()]
    paths += [(p, f"fixtures/{p.name}") for p in sorted(FIXTURES.glob("*.pcap"))]
    cases = []
    for path, name in paths:
        appliance = is_appliance_capture(path)
        for length in (None,) if appliance else PACKET_LENGTHS:
            cases.append(Case(path, name, appliance, length, FIRST_VNI + len(cases)))
    return cases


CASES = make_cases()


# -- flow keys and their counts ----------------------------------------------------------------


def _endpoint_order(endpoint) -> tuple:
    addr, port = endpoint
    return (addr is not None, addr or "", port is not None, port or 0)


def aggregate(rows) -> dict[tuple, tuple[int, int, int, int]]:
    """{flow key: (packets, bytes from the low endpoint, packets, bytes from the high)} summed
    over rows, whatever each row's orientation. A flow whose endpoints are equal (a copy cut
    before its addresses) has no direction: its counts are totals, in the first two."""
    out: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (vni, vlan, inner_vlan, ethertype, ip_version, protocol, src_addr, src_port,
         dst_addr, dst_port, packets, wire, rev_packets, rev_wire) in rows:
        src, dst = (src_addr, src_port), (dst_addr, dst_port)
        forward = _endpoint_order(src) <= _endpoint_order(dst)
        low, high = (src, dst) if forward else (dst, src)
        counts = out[(vni, vlan, inner_vlan, ethertype, ip_version, protocol, low, high)]
        if low == high:
            add = (packets + rev_packets, wire + rev_wire, 0, 0)
        elif forward:
            add = (packets, wire, rev_packets, rev_wire)
        else:
            add = (rev_packets, rev_wire, packets, wire)
        for i, value in enumerate(add):
            counts[i] += value
    return {key: tuple(counts) for key, counts in out.items()}


def flow_rows(data_dir: Path) -> list[tuple]:
    con = connect(data_dir)
    try:
        return con.execute(f"SELECT {FLOW_COLUMNS} FROM flows").fetchall()
    finally:
        con.close()


# -- the ingest side ---------------------------------------------------------------------------


def write_pcap(path: Path, frames) -> None:
    """A classic pcap (ns timestamps, Ethernet) of (timestamp_ns, frame, wire length)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for ts, frame, wire_len in frames:
            f.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), wire_len))
            f.write(frame)


def cut_capture(case: Case, path: Path) -> Path:
    """The plain capture as the session mirrors it: each record as the Ethernet frame ingest
    makes of it, cut to the packet length. Records ingest skips stay out."""
    frames = []
    for record in read_capture(case.path):
        if record.linktype == 1:
            frame = record.data
        else:
            located = link_layer(record.linktype, record.data)
            if located is None:
                continue
            ethertype, l3 = located
            frame = bytes(12) + ethertype.to_bytes(2, "big") + bytes(record.data[l3:])
        frames.append((record.timestamp_ns, frame[:case.packet_length], len(frame)))
    write_pcap(path, frames)
    return path


def ingest_case(case: Case, data: Path, scratch: Path, collector_id: str) -> None:
    """Ingest the case's capture, as its session mirrors it, into the dataset `data`."""
    capture = case.path
    if case.packet_length is not None:
        capture = cut_capture(case, scratch / f"{collector_id}.pcap")
    ingest([capture], Pipeline(data, collector_id=collector_id), vni=case.vni)


# -- the live side: every case replayed, phase by phase -----------------------------------------


@dataclass
class Live:
    flows: dict[str, dict] = field(default_factory=dict)  # case id -> aggregate()
    summaries: dict = field(default_factory=dict)  # case id -> ReplaySummary
    stray: list = field(default_factory=list)  # rows of no case's VNI
    metrics: object = None
    exit_code: int | None = None


def phases(cases: list[Case], vnis: dict[str, set]) -> list[list[Case]]:
    """Cases grouped so that no two in a group share a VNI."""
    groups: list[tuple[list[Case], set]] = []
    for case in cases:
        for members, used in groups:
            if not used & vnis[case.id]:
                members.append(case)
                used |= vnis[case.id]
                break
        else:
            groups.append(([case], set(vnis[case.id])))
    return [members for members, _ in groups]


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """case id -> the ingest side's flows. Every case is ingested into one dataset under a
    collector id of its own, which tells their rows apart."""
    root = tmp_path_factory.mktemp("ingest")
    for number, case in enumerate(CASES):
        ingest_case(case, root / "data", root, f"case{number}")
    con = connect(root / "data")
    try:
        rows = con.execute(f"SELECT collector_id, {FLOW_COLUMNS} FROM flows").fetchall()
    finally:
        con.close()
    by_case = defaultdict(list)
    for row in rows:
        by_case[row[0]].append(row[1:])
    return {case.id: aggregate(by_case[f"case{number}"]) for number, case in enumerate(CASES)}


@pytest.fixture(scope="module")
def live(tmp_path_factory, expected) -> Live:
    root = tmp_path_factory.mktemp("live")
    # the VNIs each case's rows carry: what ingest found, and the case's own
    vnis = {case.id: {key[0] for key in expected[case.id]} | {case.vni} for case in CASES}
    result = Live()
    server = CollectorServer(root / "serve").start()
    try:
        for number, group in enumerate(phases(CASES, vnis)):
            for case in group:
                result.summaries[case.id] = server.replay(
                    case.path, vni=case.vni, packet_length=case.packet_length,
                    as_captured=case.appliance, pps=PPS)
            server.flush()
            dataset = root / f"phase{number}"
            move_dataset(server.data_dir, dataset)
            owner = {vni: case.id for case in group for vni in vnis[case.id]}
            by_case = defaultdict(list)
            for row in flow_rows(dataset):
                if row[0] in owner:
                    by_case[owner[row[0]]].append(row)
                else:
                    result.stray.append(row)
            for case in group:
                result.flows[case.id] = aggregate(by_case[case.id])
        result.metrics = server.metrics()
    finally:
        try:
            result.exit_code = server.stop()
        finally:
            server.kill()
    return result


def move_dataset(data: Path, destination: Path) -> None:
    """Move the finished Parquet files out of the server's data directory (a flush wrote
    every row; nothing is written while nothing is sent)."""
    for path in sorted(data.rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        target = destination / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)


# -- the comparisons ---------------------------------------------------------------------------


def describe(flows: dict, others: dict) -> str:
    lines = []
    for key in sorted(set(flows) | set(others), key=repr):
        if flows.get(key) != others.get(key):
            lines.append(f"  {key}: live {flows.get(key)}, ingest {others.get(key)}")
    return "\n".join(lines)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_replay_meters_what_ingest_meters(case, live, expected):
    summary = live.summaries[case.id]
    assert summary.failed == 0, summary.format()
    want = expected[case.id]
    got = live.flows[case.id]
    assert got == want, f"{case.id}: flows that differ\n{describe(got, want)}"
    # and every datagram sent became one packet of a flow (none malformed)
    assert sum(c[0] + c[2] for c in got.values()) == summary.packets


def test_nothing_dropped_or_left_over(live):
    assert live.exit_code == 0
    metrics = live.metrics
    assert metrics.value("collector_kernel_drops_total") == 0
    assert metrics.value("collector_socket_drops") == 0
    assert metrics.value("collector_datagrams_received_total") == sum(
        s.packets for s in live.summaries.values())
    assert live.stray == []


def test_the_shared_captures_are_there():
    if not any(not c.name.startswith("fixtures/") for c in CASES):
        unavailable(f"no captures in {PCAPS_DIR}")
