"""`collector.ingest` end to end: capture files -> pipeline -> Parquet -> SQL, exact rows.

The fixtures (fixtures/README.md says what each holds) are ingested and the flows read back
with `collector.query.connect`. Timestamps are compared as microseconds since the fixtures'
start, 2026-01-01T00:00:00Z (packet i of the conversation at i ms; a receiver's copy 50 µs
after the sender's).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from collector import build
from collector.capture import CaptureError
from collector.flows import FlowConfig
from collector.ingest import ingest
from collector.pipeline import Pipeline
from collector.query import connect
from tests import pcaps

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
START_US = 1767225600_000000  # 2026-01-01T00:00:00Z, the fixtures' first packet
SEED_VNI = 7159709
PLAIN_CAPTURE = pcaps.PCAPS_DIR / "mixed" / "arkime_curl-enabled-tls13.pcap"

COLUMNS = (
    "vni", "vlan_id", "inner_vlan_id", "ethertype", "ip_version", "protocol",
    "src_addr", "dst_addr", "src_port", "dst_port",
    "packets", "bytes", "rev_packets", "rev_bytes",
    "captured_bytes", "rev_captured_bytes", "truncated_packets", "rev_truncated_packets",
    "tcp_flags", "rev_tcp_flags", "end_reason", "first_us", "last_us",
)
ORDER = "vni, ip_version, protocol, vlan_id NULLS FIRST, src_port"


def run_ingest(paths, data: Path, *, vni: int | None = None, config: FlowConfig | None = None):
    pipeline = Pipeline(data, collector_id="test", flow_config=config)
    return ingest(paths, pipeline, vni=vni)


def flow_rows(data: Path, where: str = "true") -> list[tuple]:
    """The flows of the dataset at `data` as tuples of COLUMNS (times: µs since START_US)."""
    times = f"epoch_us(first_seen) - {START_US}, epoch_us(last_seen) - {START_US}"
    con = connect(data)
    try:
        return con.sql(f"SELECT {', '.join(COLUMNS[:-2])}, {times} FROM flows WHERE {where}"
                       f" ORDER BY {ORDER}").fetchall()
    finally:
        con.close()


def as_dicts(rows: list[tuple]) -> list[dict]:
    return [dict(zip(COLUMNS, row)) for row in rows]


# -- the seed session: every copy cut to 25 bytes ---------------------------------------------

# Per protocol, one flow without addresses or ports: all its copies are one (unknown) endpoint,
# so everything is on the forward side. bytes: the IP total lengths, which survive the cut
# (DNS 66 + 82 + 66 + 94; TCP 7 x 40 + 86 + 79 + 53; ICMP 4 x 76); captured 25 each.
SEED_ROWS = [
    (SEED_VNI, None, None, 0x0800, 4, 1, None, None, None, None,
     4, 304, 0, 0, 100, 0, 4, 0, 0, 0, "shutdown", 14000, 17000),
    (SEED_VNI, None, None, 0x0800, 4, 6, None, None, None, None,
     10, 498, 0, 0, 250, 0, 10, 0, 0, 0, "shutdown", 4000, 13000),
    (SEED_VNI, None, None, 0x0800, 4, 17, None, None, None, None,
     4, 308, 0, 0, 100, 0, 4, 0, 0, 0, "shutdown", 0, 3000),
]


def test_seed_session_flows_have_no_addresses_and_count_header_bytes(tmp_path):
    result = run_ingest([FIXTURES / "seed-session.pcap"], tmp_path)
    assert (result.records, result.mirror_datagrams, result.plain_packets, result.skipped) == (
        18, 18, 0, 0)
    rows = flow_rows(tmp_path)
    assert rows == SEED_ROWS
    for row in as_dicts(rows):
        assert row["truncated_packets"] == row["packets"]  # every copy is cut
        assert row["captured_bytes"] == 25 * row["packets"]  # PacketLength 25


def test_seed_session_bytes_are_the_whole_packets_bytes(tmp_path):
    """The 25-byte copies count the same IP bytes per protocol as whole copies of the same
    packets (full-session, VNI 42, the conversation without the IPv6 and VLAN extras)."""
    run_ingest([FIXTURES / "seed-session.pcap"], tmp_path / "seed")
    run_ingest([FIXTURES / "full-session.pcap"], tmp_path / "full")
    query = ("SELECT protocol, sum(packets + rev_packets), sum(bytes + rev_bytes) FROM flows"
             " WHERE {} GROUP BY protocol ORDER BY protocol")
    con_seed, con_full = connect(tmp_path / "seed"), connect(tmp_path / "full")
    try:
        seed = con_seed.sql(query.format("true")).fetchall()
        whole = con_full.sql(query.format(
            "vni = 42 AND ip_version = 4 AND vlan_id IS NULL")).fetchall()
    finally:
        con_seed.close()
        con_full.close()
    assert seed == whole == [(1, 4, 304), (6, 10, 498), (17, 4, 308)]


# -- the full session: two mirror sources ------------------------------------------------------

TCP_FLAGS = build.SYN | build.ACK | build.PSH | build.FIN  # 27: both sides sent all four
IPV6_FLAGS = build.SYN | build.ACK | build.FIN  # 19
FULL_ROWS = [
    # VNI 42, the instance's ENI: everything, the server's packets 50 µs after they were sent
    (42, None, None, 0x0800, 4, 1, "10.0.1.10", "10.0.3.30", 8, 0,
     2, 152, 2, 152, 180, 180, 0, 0, 0, 0, "shutdown", 14000, 17050),
    (42, None, None, 0x0800, 4, 6, "10.0.1.10", "10.0.3.30", 40000, 80,
     5, 246, 5, 252, 316, 322, 0, 0, TCP_FLAGS, TCP_FLAGS, "fin", 4000, 13050),
    (42, None, None, 0x0800, 4, 17, "10.0.1.10", "10.0.0.2", 53001, 53,
     1, 66, 1, 82, 80, 96, 0, 0, 0, 0, "shutdown", 0, 1000),
    (42, None, None, 0x0800, 4, 17, "10.0.1.10", "10.0.0.2", 53002, 53,
     1, 66, 1, 94, 80, 108, 0, 0, 0, 0, "shutdown", 2000, 3000),
    (42, 100, None, 0x0800, 4, 17, "10.0.1.10", "10.0.3.30", 40514, 514,
     1, 45, 0, 0, 63, 0, 0, 0, 0, 0, "shutdown", 24000, 24000),
    (42, None, None, 0x86DD, 6, 6, "2001:db8:1::a", "2001:db8:3::1e", 40100, 443,
     4, 240, 2, 120, 296, 148, 0, 0, IPV6_FLAGS, IPV6_FLAGS, "fin", 18000, 23000),
    # VNI 43, the server's ENI: no DNS, no VLAN datagram; the client's packets 50 µs late
    (43, None, None, 0x0800, 4, 1, "10.0.1.10", "10.0.3.30", 8, 0,
     2, 152, 2, 152, 180, 180, 0, 0, 0, 0, "shutdown", 14050, 17000),
    (43, None, None, 0x0800, 4, 6, "10.0.1.10", "10.0.3.30", 40000, 80,
     5, 246, 5, 252, 316, 322, 0, 0, TCP_FLAGS, TCP_FLAGS, "fin", 4050, 13000),
    (43, None, None, 0x86DD, 6, 6, "2001:db8:1::a", "2001:db8:3::1e", 40100, 443,
     4, 240, 2, 120, 296, 148, 0, 0, IPV6_FLAGS, IPV6_FLAGS, "fin", 18050, 23050),
]


def test_full_session_flows(tmp_path):
    result = run_ingest([FIXTURES / "full-session.pcap"], tmp_path)
    assert (result.records, result.mirror_datagrams, result.skipped) == (45, 45, 0)
    assert flow_rows(tmp_path) == FULL_ROWS


def test_full_session_vnis_stay_separate_flows_of_one_conversation(tmp_path):
    run_ingest([FIXTURES / "full-session.pcap"], tmp_path)
    con = connect(tmp_path)
    try:
        by_vni = con.sql(
            "SELECT protocol, src_port, list(vni ORDER BY vni), count(DISTINCT community_id)"
            " FROM flows WHERE vlan_id IS NULL AND dst_addr <> '10.0.0.2'"
            " GROUP BY ALL ORDER BY ALL").fetchall()
        tagged = con.sql("SELECT vni, vlan_id, inner_vlan_id, dst_port FROM flows"
                         " WHERE vlan_id IS NOT NULL").fetchall()
    finally:
        con.close()
    # each conversation between the two ENIs: one row per VNI, one Community ID for both
    assert by_vni == [(1, 8, [42, 43], 1), (6, 40000, [42, 43], 1), (6, 40100, [42, 43], 1)]
    assert tagged == [(42, 100, None, 514)]


def test_gwlb_session_has_the_flows_of_full_session_vni_42(tmp_path):
    """GENEVE -> IPv4 -> UDP 4789 -> VXLAN is removed entirely: the same flows as the copies
    the instance's ENI sent directly (timestamps aside: there the server's packets are the
    receiver's copies, 50 µs later)."""
    result = run_ingest([FIXTURES / "gwlb-session.pcap"], tmp_path / "gwlb")
    run_ingest([FIXTURES / "full-session.pcap"], tmp_path / "full")
    assert (result.records, result.mirror_datagrams) == (18, 18)
    conversation = "vni = 42 AND ip_version = 4 AND vlan_id IS NULL"
    gwlb = [row[:-2] for row in flow_rows(tmp_path / "gwlb")]
    full = [row[:-2] for row in flow_rows(tmp_path / "full", conversation)]
    assert gwlb == full
    assert len(gwlb) == 4


# -- --vni ---------------------------------------------------------------------------------


def _plain_capture() -> Path:
    if not PLAIN_CAPTURE.is_file():
        pcaps.unavailable(f"{PLAIN_CAPTURE} is missing (../shared/pcaps)")
    return PLAIN_CAPTURE


def test_vni_is_null_for_a_plain_capture_without_vni(tmp_path):
    result = run_ingest([_plain_capture()], tmp_path)
    assert (result.records, result.plain_packets, result.mirror_datagrams) == (35, 35, 0)
    con = connect(tmp_path)
    try:
        assert con.sql("SELECT count(*), count(vni), sum(packets + rev_packets) FROM flows"
                       ).fetchall() == [(2, 0, 35)]
    finally:
        con.close()


def test_vni_option_sets_the_vni_of_every_plain_packet(tmp_path):
    run_ingest([_plain_capture()], tmp_path / "without")
    run_ingest([_plain_capture()], tmp_path / "with", vni=SEED_VNI)
    columns = "ethertype, protocol, src_addr, dst_addr, src_port, dst_port, packets, bytes"
    con_without, con_with = connect(tmp_path / "without"), connect(tmp_path / "with")
    try:
        vnis = con_with.sql("SELECT DISTINCT vni FROM flows").fetchall()
        with_vni = con_with.sql(f"SELECT {columns} FROM flows ORDER BY ALL").fetchall()
        without = con_without.sql(f"SELECT {columns} FROM flows ORDER BY ALL").fetchall()
    finally:
        con_without.close()
        con_with.close()
    assert vnis == [(SEED_VNI,)]
    assert with_vni == without  # the same flows otherwise
    assert len(with_vni) == 2  # DNS and the TLS connection


def test_vni_option_does_not_change_the_vni_of_mirror_copies(tmp_path):
    run_ingest([FIXTURES / "full-session.pcap"], tmp_path, vni=7)
    assert flow_rows(tmp_path) == FULL_ROWS  # VNIs 42 and 43, from the tunnel


@pytest.mark.parametrize("vni", [-1, 1 << 24])
def test_vni_option_outside_24_bits_is_refused(tmp_path, vni):
    pipeline = Pipeline(tmp_path, collector_id="test")
    with pytest.raises(ValueError, match=str(vni)):
        ingest([FIXTURES / "seed-session.pcap"], pipeline, vni=vni)


# -- a capture cut mid-record ------------------------------------------------------------------

PCAP_HEADER_LEN, RECORD_HEADER_LEN = 24, 16


def record_offsets(data: bytes) -> list[int]:
    """Byte offset of every record of a classic little-endian pcap."""
    offsets, at = [], PCAP_HEADER_LEN
    while at < len(data):
        offsets.append(at)
        (caplen,) = struct.unpack_from("<I", data, at + 8)
        at += RECORD_HEADER_LEN + caplen
    return offsets


@pytest.mark.parametrize("cut_inside", ["header", "data"])
def test_a_cut_capture_raises_at_the_offset_and_keeps_the_flows_before(tmp_path, cut_inside):
    data = (FIXTURES / "full-session.pcap").read_bytes()
    offsets = record_offsets(data)
    kept = 30  # records 1-30 are whole; record 31 is cut
    at = offsets[kept]
    cut = at + (10 if cut_inside == "header" else RECORD_HEADER_LEN + 20)
    broken = tmp_path / "cut.pcap"
    broken.write_bytes(data[:cut])
    whole = tmp_path / "first-30.pcap"
    whole.write_bytes(data[:at])

    with pytest.raises(CaptureError) as caught:
        run_ingest([broken], tmp_path / "broken")
    error = caught.value
    assert error.offset == at
    assert f"record {kept + 1} at offset {at} is cut" in str(error)
    assert str(broken) in str(error)

    rows = flow_rows(tmp_path / "broken")
    assert sum(r["packets"] + r["rev_packets"] for r in as_dicts(rows)) == kept
    run_ingest([whole], tmp_path / "whole")
    assert rows == flow_rows(tmp_path / "whole")  # exactly the flows of the records before


# -- the capture's clock ends flows ------------------------------------------------------------

TCP_CONNECTION = [  # (flags, sent by the client)
    (build.SYN, True), (build.SYN | build.ACK, False), (build.ACK, True),
    (build.FIN | build.ACK, True), (build.FIN | build.ACK, False), (build.ACK, True),
]


def write_pcap(path: Path, records: list[tuple[int, bytes]]) -> Path:
    """A classic pcap (µs, Ethernet) of (µs since START_US, frame)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for offset_us, frame in records:
        sec, usec = divmod(START_US + offset_us, 1_000_000)
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


def tcp_frame(flags: int, from_client: bool) -> bytes:
    client, server = ("10.0.1.10", 40000), ("10.0.3.30", 80)
    (src, sport), (dst, dport) = (client, server) if from_client else (server, client)
    segment = build.tcp(sport=sport, dport=dport, flags=flags, ip_src=src, ip_dst=dst)
    return build.ethernet(build.ipv4(segment, src=src, dst=dst, proto=build.TCP))


def test_a_connection_closed_by_fin_and_the_next_one_on_its_ports_are_two_flows(tmp_path):
    """Port reuse: the same 5-tuple connects again 30 s after the first connection closed.
    The first ended with FIN both ways and its 2 s linger ran out long before the second SYN.

    Fails today: `ingest` expires flows (`pipeline.tick`) only when a batch of 4096 records
    is full, so in a smaller capture a closed flow is never expired; and the flow table's
    per-packet check restarts a flow only past its active timeout, and only when no FIN/RST
    ended it. The second connection is merged into the first row (12 packets, 'fin')."""
    frames = [tcp_frame(flags, client) for flags, client in TCP_CONNECTION]
    records = [(i * 1000, f) for i, f in enumerate(frames)]
    records += [(30_000_000 + i * 1000, f) for i, f in enumerate(frames)]
    capture = write_pcap(tmp_path / "reuse.pcap", records)
    run_ingest([capture], tmp_path / "data")
    rows = [(r["packets"], r["rev_packets"], r["end_reason"], r["first_us"], r["last_us"])
            for r in as_dicts(flow_rows(tmp_path / "data"))]
    assert sorted(rows, key=lambda r: r[3]) == [
        (4, 2, "fin", 0, 5000), (4, 2, "fin", 30_000_000, 30_005_000)]


def test_a_flow_idle_past_the_idle_timeout_is_ended_on_the_capture_clock(tmp_path):
    """README: "Timestamps come from the capture, and so does the clock that ends idle flows."
    Two packets of one flow 10 s apart, idle timeout 1 s (active 1 h): two rows, the first
    ended 'idle'.

    Fails today, for the reason above: no expiry runs between the two packets (one row of 2
    packets, 'shutdown'), so the result depends on where the 4096-record batches fall."""
    records = [(0, tcp_frame(build.ACK, True)), (10_000_000, tcp_frame(build.ACK, True))]
    capture = write_pcap(tmp_path / "idle.pcap", records)
    run_ingest([capture], tmp_path / "data",
               config=FlowConfig(idle_timeout=1, active_timeout=3600))
    rows = [(r["packets"], r["end_reason"], r["first_us"])
            for r in as_dicts(flow_rows(tmp_path / "data"))]
    assert sorted(rows, key=lambda r: r[2]) == [(1, "idle", 0), (1, "shutdown", 10_000_000)]


def test_packets_table_keeps_only_the_bytes_a_snaplen_kept(tmp_path):
    """A record cut by the capture's snaplen inside the mirrored frame: its packets-table
    frame is the bytes the capture holds, not the rest of the slot (which is not the
    datagram's)."""
    inner = build.ethernet(build.ipv4(build.tcp(b"x" * 400, flags=build.ACK), proto=build.TCP))
    outer = build.ethernet(build.ipv4(
        build.udp(build.vxlan(inner, vni=SEED_VNI), sport=51000, dport=4789,
                  ip_src="10.0.1.10", ip_dst="10.0.2.20"),
        src="10.0.1.10", dst="10.0.2.20", proto=build.UDP))
    kept = 14 + 20 + 8 + 8 + 90  # outer headers, VXLAN, and 90 bytes of the mirrored frame
    capture = tmp_path / "snaplen.pcap"
    capture.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, kept, 1)
                        + struct.pack("<IIII", 1767225600, 0, kept, len(outer)) + outer[:kept])
    pipeline = Pipeline(tmp_path / "data", collector_id="test", packets=True, packet_bytes=256)
    ingest([capture], pipeline)
    con = connect(tmp_path / "data")
    frame, captured = con.sql("SELECT frame, captured_len FROM packets").fetchone()
    assert frame == inner[:90]
    assert captured == len(inner)  # the frame's length as mirrored; 90 of it kept by the capture


# -- the command's process --------------------------------------------------------------------


def test_the_cli_loads_click_alone_until_a_command_runs():
    """numpy, pyarrow and the decoders are most of a short ingest's start-up: a command
    imports what it needs when it runs (after the group has set OPENBLAS_NUM_THREADS)."""
    code = ("import sys, collector.cli; "
            "print(sorted(m for m in ('numpy', 'pyarrow', 'collector.ingest', 'collector.decode') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_m_collector_ingest(tmp_path):
    """The command as the benchmark runs it, in a process of its own: its summary, its rows."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-m", "collector", "ingest",
                          str(FIXTURES / "seed-session.pcap"), "--data", str(data),
                          "--collector-id", "test"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "3 flows in 1 file(s)" in run.stderr
    assert flow_rows(data) == SEED_ROWS
