"""`collector serve` end to end: the CLI as a subprocess on free loopback ports, datagrams
built with `collector.build` sent over real UDP sockets, health and metrics over HTTP, the
dataset read back with `collector.query.connect`.

One server per scenario that stops or breaks it (the traffic run, a successful reload, the
data directory outage, a stop with the data directory gone, a worker kill, a worker restart
under a bad sessions file, IPv6 listeners); one shared server for the scenarios that leave it
as they found it (health checks, a second instance on its ports, refused reloads, --check).
Start-up refusals run all at once, without a server. Helpers: tests/serve/harness.py.

Tests whose docstring starts with BUG fail on purpose against the code they were written
for: each names the defect and what the fix must make true.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import pytest

from collector import build
from collector.query import connect
from collector.serve.worker import POLL_MS
from tests.serve import harness as h

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="collector serve needs Linux (SO_REUSEPORT, /proc)")

TCP, UDP, ICMP, ICMPV6 = build.TCP, build.UDP, build.ICMP, build.ICMPV6
NEW_VNI, NEW_SESSION_ID = 4242, "tms-0e2e4242aEXAMPLE"
# A reload reaches a worker through its pipe, read once per loop pass (at least every POLL_MS);
# nothing observable says it arrived (see the report): wait a few passes.
WORKER_TAKES_MAP = 3 * POLL_MS / 1000


def v6(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def seed_sessions_copy(directory) -> os.PathLike:
    path = directory / "sessions.json"
    shutil.copy(h.SEED_SESSIONS, path)
    return path


# -- the traffic of the main run ---------------------------------------------------------------


def main_traffic(seed: int = 20260101) -> h.Traffic:
    """Conversations over VXLAN and GENEVE, IPv4 and IPv6, TCP/UDP/ICMP, whole and cut to 25
    bytes, interleaved; then garbage of every kind at random places."""
    rng = random.Random(seed)
    t = h.Traffic()
    groups = []
    conv = t.conversation
    # VNI 100, IPv4, whole packets (some longer than a 192-byte receive slot)
    for i in range(10):
        groups.append(conv(vni=100, ip_version=4, protocol=TCP, client=f"10.0.1.{10 + i}",
                           server="10.0.3.30", cport=40000 + i, sport=443,
                           exchange=h.tcp_exchange(30 + i, size=1200 if i % 3 == 0 else 40)))
    for i in range(3):  # ended by the client's RST
        groups.append(conv(vni=100, ip_version=4, protocol=TCP, client=f"10.0.1.{50 + i}",
                           server="10.0.3.31", cport=41000 + i, sport=22,
                           exchange=h.tcp_exchange(8, rst=True)))
    for i in range(8):
        groups.append(conv(vni=100, ip_version=4, protocol=UDP, client="10.0.1.10",
                           server="10.0.0.2", cport=50000 + i, sport=53,
                           exchange=h.request_reply(8)))
    for i in range(3):
        groups.append(conv(vni=100, ip_version=4, protocol=ICMP, client=f"10.0.1.{60 + i}",
                           server="10.0.3.30", exchange=h.request_reply(6)))
    # VNI 200, IPv6, whole packets
    for i in range(6):
        groups.append(conv(vni=200, ip_version=6, protocol=TCP, client=v6(f"2001:db8:1::{10 + i:x}"),
                           server=v6("2001:db8:3::1e"), cport=42000 + i, sport=443,
                           exchange=h.tcp_exchange(20)))
    for i in range(4):
        groups.append(conv(vni=200, ip_version=6, protocol=UDP, client=v6("2001:db8:1::a"),
                           server=v6("2001:db8:3::35"), cport=51000 + i, sport=53,
                           exchange=h.request_reply(6)))
    for i in range(2):
        groups.append(conv(vni=200, ip_version=6, protocol=ICMPV6, client=v6(f"2001:db8:1::{i + 1}"),
                           server=v6("2001:db8:3::1"), exchange=h.request_reply(6)))
    # the seed session (VNI 7159709, PacketLength 25): copies cut to 25 bytes, no addresses
    for i in range(40):
        groups.append(conv(vni=h.SEED_VNI, ip_version=4, protocol=TCP, client=f"10.1.0.{i + 1}",
                           server="10.2.0.1", cport=30000 + i, sport=80,
                           exchange=h.tcp_exchange(6), cut=25))
    for i in range(30):
        groups.append(conv(vni=h.SEED_VNI, ip_version=4, protocol=UDP, client=f"10.1.1.{i + 1}",
                           server="10.2.0.2", cport=31000 + i, sport=123,
                           exchange=h.request_reply(4), cut=25))
    for i in range(10):
        groups.append(conv(vni=h.SEED_VNI, ip_version=4, protocol=ICMP, client=f"10.1.2.{i + 1}",
                           server="10.2.0.3", exchange=h.request_reply(3), cut=25))
    for i in range(15):
        groups.append(conv(vni=h.SEED_VNI, ip_version=6, protocol=TCP, client=v6(f"fd00:1::{i + 1:x}"),
                           server=v6("fd00:2::1"), cport=32000 + i, sport=443,
                           exchange=h.tcp_exchange(4), cut=25))
    for i in range(10):
        groups.append(conv(vni=h.SEED_VNI, ip_version=6, protocol=UDP, client=v6(f"fd00:1::{i + 100:x}"),
                           server=v6("fd00:2::2"), cport=33000 + i, sport=53,
                           exchange=h.request_reply(2), cut=25))
    # GWLB: GENEVE -> IPv4 -> UDP 4789 -> VXLAN, VNI 300 whole, VNI 301 cut to 25
    for i in range(6):
        groups.append(conv(vni=300, ip_version=4, protocol=TCP, client=f"172.16.0.{i + 1}",
                           server="172.16.9.9", cport=43000 + i, sport=8443,
                           exchange=h.tcp_exchange(12), listener="geneve"))
    for i in range(4):
        groups.append(conv(vni=300, ip_version=6, protocol=UDP, client=v6(f"fd00:3::{i + 1:x}"),
                           server=v6("fd00:3::ffff"), cport=52000 + i, sport=514,
                           exchange=h.request_reply(5), listener="geneve"))
    for i in range(10):
        groups.append(conv(vni=301, ip_version=4, protocol=TCP, client=f"172.17.0.{i + 1}",
                           server="172.17.9.9", cport=44000 + i, sport=80,
                           exchange=h.tcp_exchange(3), listener="geneve", cut=25))
    t.interleave(groups, rng)

    # garbage, each with the reason the decoder must give
    frame = build.mirrored_frame(build.FrameSpec()).data
    gwlb_inner = build.ipv4(build.udp(build.vxlan(frame, vni=300), dport=build.VXLAN_PORT),
                            proto=UDP)
    garbage = []
    garbage += [t.malformed(build.vxlan(frame, vni=100 + i, flags=0x00), "vxlan", "vxlan_no_vni_flag")
                for i in range(40)]
    garbage += [t.malformed(b"", "vxlan", "vxlan_truncated") for _ in range(20)]
    garbage += [t.malformed(b"", "geneve", "geneve_truncated") for _ in range(20)]
    garbage += [t.malformed(build.geneve(gwlb_inner, version=1, options=build.aws_gwlb_options()),
                            "geneve", "geneve_version") for _ in range(30)]
    garbage += t.garbage(rng, "vxlan", 100)
    garbage += t.garbage(rng, "geneve", 100)
    for item in garbage:
        t.datagrams.insert(rng.randrange(len(t.datagrams) + 1), item)
    return t


# -- the main run: one server, traffic, metrics, SIGTERM, the dataset --------------------------


@dataclass
class Run:
    server: h.Server
    traffic: h.Traffic
    sent: int
    metrics: h.Metrics  # scraped just before SIGTERM
    returncode: int
    stop_seconds: float

    def sql(self, query: str) -> list[tuple]:
        return connect(self.server.data).sql(query).fetchall()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("traffic")
    server = h.Server(workdir, sessions=(seed_sessions_copy(workdir),),
                      extra=("--log-format", "json"))
    traffic = main_traffic()
    with server, h.Sender() as sender:
        server.wait_healthy()
        sent = sender.send_traffic(traffic, server.ports)
        # each worker reports all its counters at once: when the datagrams add up, so does
        # everything counted of them
        metrics = server.wait_received(sent)
        drops = (metrics.value("collector_kernel_drops_total"),
                 metrics.value("collector_socket_drops"))
        if any(drops):
            pytest.fail(f"the kernel dropped datagrams on loopback (SO_RXQ_OVFL {drops[0]:.0f}, "
                        f"/proc/net/udp {drops[1]:.0f}): the sender outran the workers, so "
                        f"exact counts cannot hold; pace Sender.send_traffic (chunk/pause)",
                        pytrace=False)
        returncode = server.stop()
    return Run(server, traffic, sent, metrics, returncode, server.stop_seconds)


def test_sigterm_exits_0_promptly(run):
    assert run.returncode == 0, run.server.log_tail()
    assert run.stop_seconds < h.STOP_TIMEOUT
    assert run.server.stdout_path.read_text() == ""


def test_metrics_reconcile_with_what_was_sent(run):
    m, t = run.metrics, run.traffic
    received = m.value("collector_datagrams_received_total")
    decoded = m.value("collector_datagrams_decoded_total")
    malformed = m.value("collector_datagrams_malformed_total")
    assert received == decoded + malformed == run.sent == len(t.datagrams)
    assert m.by_label("collector_datagrams_received_total", "listener") == t.by_listener()
    assert m.by_label("collector_bytes_received_total", "listener") == t.bytes_by_listener()
    assert decoded == len(t.decoded())
    reasons = {k: v for k, v in m.by_label("collector_datagrams_malformed_total", "reason").items() if v}
    assert reasons == t.by_reason()
    assert m.value("collector_truncated_copies_total") == t.truncated()
    # sessions: only the seed VNI is known
    assert m.value("collector_unknown_vni_total") == sum(
        n for vni, n in t.packets_by_vni().items() if vni != h.SEED_VNI)
    sessions = {(labels["vni"], labels["session_id"]): value
                for labels, value in m.find("collector_session_packets_total")}
    assert sessions == {(str(vni), h.SEED_SESSION_ID if vni == h.SEED_VNI else ""): n
                        for vni, n in t.packets_by_vni().items()}
    assert m.by_label("collector_session_bytes_total", "vni") == {
        str(vni): n for vni, n in t.wire_by_vni().items()}
    assert m.value("collector_kernel_drops_total") == 0
    assert m.value("collector_workers_up") == 2 and m.value("collector_healthy") == 1


def test_packets_per_vni_and_protocol(run):
    t = run.traffic
    per_vni = dict(run.sql("SELECT vni, sum(packets + rev_packets) FROM flows GROUP BY vni"))
    assert per_vni == dict(t.packets_by_vni())
    per_protocol = dict(run.sql("SELECT protocol, sum(packets + rev_packets) FROM flows GROUP BY ALL"))
    assert per_protocol == dict(t.packets_by_protocol())
    wire = dict(run.sql("SELECT vni, sum(bytes + rev_bytes) FROM flows GROUP BY vni"))
    assert wire == dict(t.wire_by_vni())
    captured = dict(run.sql("SELECT vni, sum(captured_bytes + rev_captured_bytes) FROM flows GROUP BY vni"))
    assert captured == dict(t.captured_by_vni())


def test_conversations_merge_both_workers_exactly(run):
    rows = run.sql("""
        SELECT vni, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
               packets, bytes, rev_packets, rev_bytes, truncated_packets, tcp_flags,
               rev_tcp_flags, segments
        FROM conversations WHERE src_addr IS NOT NULL""")
    actual = {row[:7]: row[7:] for row in rows}
    assert len(actual) == len(rows), "a 5-tuple in two conversations rows"
    expected = {key: (e.packets, e.bytes, e.rev_packets, e.rev_bytes, 0, e.tcp_flags,
                      e.rev_tcp_flags) for key, e in run.traffic.expected.items()}
    assert set(actual) == set(expected)
    for key, values in actual.items():
        assert values[:7] == expected[key], key
    # every datagram left from its own source port, so SO_REUSEPORT spread conversations
    # over both workers: some were metered in two segments, merged above
    assert max(v[7] for v in actual.values()) == 2
    assert min(v[7] for v in actual.values()) >= 1


def test_flows_per_five_tuple(run):
    per_key = run.sql("""
        SELECT count(*) AS rows
        FROM flows WHERE src_addr IS NOT NULL
        GROUP BY vni, protocol, least(src_addr, dst_addr), greatest(src_addr, dst_addr),
                 least(src_port, dst_port), greatest(src_port, dst_port)""")
    assert len(per_key) == len(run.traffic.expected)
    # no timeout ended a flow during the run: one row per worker that saw the 5-tuple
    rows_per_key = {row[0] for row in per_key}
    assert rows_per_key <= {1, 2} and 2 in rows_per_key, rows_per_key
    total = run.sql("SELECT count(*) FROM flows")[0][0]
    merged = run.sql("SELECT sum(segments) FROM conversations")[0][0]
    assert merged == total
    files = [p.name for p in (run.server.data / "flows").rglob("*.parquet")]
    assert any(n.startswith("e2e-w0-") for n in files) and any(n.startswith("e2e-w1-") for n in files)
    assert not list((run.server.data / "flows").rglob(".*.tmp"))


def test_truncated_copies_count_without_addresses(run):
    rows = run.sql("""
        SELECT vni, ip_version, protocol, packets, bytes, rev_packets, truncated_packets,
               src_port, dst_addr
        FROM conversations WHERE src_addr IS NULL""")
    actual = {row[:3]: row[3:] for row in rows}
    expected = {key: (e.packets, e.bytes, 0, e.truncated, None, None)
                for key, e in run.traffic.cut_groups().items()}
    assert actual == expected
    assert run.sql("SELECT sum(truncated_packets + rev_truncated_packets) FROM flows")[0][0] \
        == run.traffic.truncated()


def test_end_reasons(run):
    rst = {key for key, e in run.traffic.expected.items() if e.last_flags & build.RST}
    assert len(rst) == 3
    reasons = dict(run.sql("SELECT end_reason, count(*) FROM flows GROUP BY ALL"))
    assert set(reasons) == {"shutdown", "rst"}
    assert reasons["rst"] == len(rst)  # the one segment holding the RST
    by_conversation = {row[:7]: row[7] for row in run.sql("""
        SELECT vni, ip_version, protocol, src_addr, src_port, dst_addr, dst_port, end_reason
        FROM conversations""")}
    for key, reason in by_conversation.items():
        assert reason == ("rst" if key in rst else "shutdown"), key


def test_sessions_are_in_the_dataset(run):
    assert run.sql("SELECT vni, session_id, packet_length, collector_id FROM sessions") == [
        (h.SEED_VNI, h.SEED_SESSION_ID, 25, "e2e")]
    named = run.sql("""SELECT DISTINCT vni, session_id, network_interface_id FROM flows
                       ORDER BY vni""")
    assert named == [(100, None, None), (200, None, None), (300, None, None),
                     (301, None, None), (h.SEED_VNI, h.SEED_SESSION_ID, "eni-070203f901EXAMPLE")]


def test_final_log_line_reconciles_with_the_dataset(run):
    messages = [json.loads(line)["message"] for line in run.server.stderr_lines()]
    stopped = [m for m in messages if m.startswith("stopped: ")]
    assert len(stopped) == 1, messages
    numbers = [int(n) for n in re.findall(r"\d+", stopped[0])]
    flows = run.sql("SELECT count(*) FROM flows")[0][0]
    t = run.traffic
    assert numbers == [run.sent, len(t.decoded()), sum(t.by_reason().values()), flows]


def test_json_log_format_every_stderr_line(run):
    lines = run.server.stderr_lines()
    assert lines
    pids = set()
    for line in lines:
        entry = json.loads(line)  # every line, also the workers'
        assert {"time", "level", "logger", "pid", "message"} <= set(entry), entry
        pids.add(entry["pid"])
    messages = " | ".join(json.loads(line)["message"] for line in lines)
    assert "collector serving" in messages and "malformed datagrams" in messages
    assert len(pids) >= 2  # the supervisor's lines and at least one worker's


# -- a server shared by scenarios that leave it running ----------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shared")
    server = h.Server(workdir, sessions=(seed_sessions_copy(workdir),))
    with server:
        server.wait_healthy()
        yield server
        assert server.stop() == 0, server.log_tail()


def send_and_count(server: h.Server, datagrams, port=None) -> h.Metrics:
    """Send and wait until the workers report them all; returns the metrics then."""
    before = server.scrape().value("collector_datagrams_received_total")
    with h.Sender() as sender:
        sent = sender.send(datagrams, port or server.ports.vxlan)
    metrics = server.wait_received(before + sent)
    assert metrics.value("collector_datagrams_received_total") == before + sent
    return metrics


def seed_copies(count: int, vni: int = h.SEED_VNI, cut: int | None = 25) -> list[bytes]:
    out = []
    for i in range(count):
        frame = build.mirrored_frame(build.FrameSpec(src=f"10.9.{i // 250}.{i % 250 + 1}",
                                                     sport=20000 + i)).data
        out.append(build.vxlan(build.truncate(frame, cut), vni=vni))
    return out


def test_plain_tcp_connect_to_health_port(shared):
    """An NLB TCP health check is a bare connect (and close)."""
    with socket.create_connection((h.LOOPBACK, shared.ports.health), timeout=3):
        pass
    assert shared.healthz()[0] == 200


def test_health_and_metrics_endpoints(shared):
    status, body = shared.healthz()
    assert status == 200
    assert body["status"] == "ok" and body["reasons"] == [] and body["collector_id"] == "e2e"
    assert [w["worker"] for w in body["workers"]] == [0, 1]
    assert all(w["alive"] for w in body["workers"])
    status, text, content_type = shared.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert h.Metrics(text.decode()).has("collector_datagrams_received_total")
    assert shared.get("/nothing")[0] == 404


@pytest.mark.parametrize("busy", ["listen", "geneve-listen", "health"])
def test_second_instance_on_a_busy_port_exits_2(shared, tmp_path, busy):
    ports = h.Ports.pick()
    port = {"listen": ports.vxlan, "geneve-listen": ports.geneve, "health": ports.health}
    port[busy] = {"listen": shared.ports.vxlan, "geneve-listen": shared.ports.geneve,
                  "health": shared.ports.health}[busy]
    args = ["--workers", "2", "--data", shared.data, "--min-free", "1M",
            "--sessions", shared.sessions[0]]
    args += [item for key, value in port.items() for item in (f"--{key}", f"{h.LOOPBACK}:{value}")]
    result = h.run_serve(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"collector serve: --{busy} ")
    assert f"{h.LOOPBACK}:{port[busy]}" in lines[0] and "in use" in lines[0]
    # the first one is untouched: healthy, and it still gets every datagram
    assert shared.healthz()[0] == 200
    metrics = send_and_count(shared, seed_copies(100))
    assert metrics.value("collector_kernel_drops_total") == 0


@pytest.fixture(scope="module")
def reloading(tmp_path_factory):
    """A server sent SIGHUP as soon as it says it serves: its workers are still starting."""
    workdir = tmp_path_factory.mktemp("reload")
    server = h.Server(workdir, sessions=(seed_sessions_copy(workdir),))
    with server:
        server.wait_log("collector serving", timeout=h.START_TIMEOUT)
        server.send_signal(signal.SIGHUP)
        yield server
        # test_sighup_reloads_a_new_session stops it and checks the exit; here only what a
        # failed test left running is cleaned up (by the `with`: SIGKILL to its group)


def test_sighup_during_worker_start_does_not_kill_workers(reloading):
    """A worker sets its signal handlers only in Worker.run, 1-2 s after spawn (imports,
    sockets). A reload in that window must not reach it as a signal: the supervisor once
    forwarded SIGHUP, which killed starting workers ('exited with -1')."""
    if reloading.running():
        reloading.wait_log("SIGHUP: 1 sessions loaded", timeout=5)
        reloading.wait_healthy()
    assert "SIGHUP: 1 sessions loaded" in reloading.stderr()
    died = [line for line in reloading.stderr_lines() if "exited with" in line]
    assert not died, "\n".join(died)


def test_sighup_reloads_a_new_session(reloading):
    """Traffic of a VNI no session names; the sessions file gains that session; SIGHUP; the
    metrics label the VNI with the new session, the workers stop counting it unknown, the
    `sessions` table holds it, and flows exported afterwards carry it. (Not on the shared
    server: a successful reload is the one thing that one never does.) Stops the server."""
    server = reloading
    server.wait_log("SIGHUP: ", timeout=5)  # the early reload is done (or failed)
    server.wait_healthy()
    metrics = send_and_count(server, seed_copies(40, vni=NEW_VNI, cut=None))
    assert metrics.find("collector_session_packets_total", vni=NEW_VNI) == [
        ({"vni": str(NEW_VNI), "session_id": ""}, 40.0)]
    assert metrics.value("collector_unknown_vni_total") == 40

    h.write_json_atomically(server.sessions[0], h.sessions_document(
        h.SEED_SESSION, h.session(NEW_VNI, NEW_SESSION_ID, "eni-0e2e0000000EXAMPLE", 2)))
    mark = server.log_mark()
    server.send_signal(signal.SIGHUP)
    server.wait_log("SIGHUP: 2 sessions loaded", after=mark, timeout=5)
    time.sleep(WORKER_TAKES_MAP)
    assert "Traceback" not in server.stderr()[mark:], server.log_tail()

    metrics = send_and_count(server, seed_copies(60, vni=NEW_VNI, cut=None))
    assert metrics.find("collector_session_packets_total", vni=NEW_VNI) == [
        ({"vni": str(NEW_VNI), "session_id": NEW_SESSION_ID}, 100.0)]
    assert metrics.value("collector_unknown_vni_total") == 40  # the workers know it now
    assert server.healthz()[0] == 200
    rows = connect(server.data).sql(
        f"SELECT session_id, network_interface_id FROM sessions WHERE vni = {NEW_VNI}").fetchall()
    assert rows == [(NEW_SESSION_ID, "eni-0e2e0000000EXAMPLE")]
    assert server.stop() == 0, server.log_tail()
    flows = connect(server.data).sql(f"""
        SELECT DISTINCT session_id, network_interface_id FROM flows WHERE vni = {NEW_VNI}""").fetchall()
    assert flows == [(NEW_SESSION_ID, "eni-0e2e0000000EXAMPLE")]


def _bad_reload(server: h.Server, bad: str):
    """Write `bad` over the sessions file and SIGHUP; returns the original text (restore it
    with _restore) and the stderr offset before the SIGHUP."""
    path = server.sessions[0]
    original = path.read_text()
    h.write_json_atomically(path, bad)
    mark = server.log_mark()
    server.send_signal(signal.SIGHUP)
    server.wait_log("sessions reload failed, keeping the old map", after=mark)
    return original, mark


def _restore(server: h.Server, original: str) -> None:
    """Put the file back. No SIGHUP: the refused reload left the old map in force."""
    h.write_json_atomically(server.sessions[0], original)


@pytest.mark.parametrize("bad", [
    '{"TrafficMirrorSessions": [',  # not JSON
    json.dumps(h.sessions_document(dict(h.SEED_SESSION, VirtualNetworkId="12"))),
    json.dumps(h.sessions_document(h.SEED_SESSION, h.session(h.SEED_VNI, "tms-other"))),
], ids=["not-json", "bad-vni", "duplicate-vni"])
def test_sighup_with_bad_sessions_keeps_the_old_map(shared, bad):
    original, mark = _bad_reload(shared, bad)
    try:
        log = shared.stderr()[mark:]
        error = log.split("keeping the old map", 1)[1].splitlines()[0]
        assert "sessions.json" in error, error  # names the file
        assert "sessions loaded" not in log
        time.sleep(WORKER_TAKES_MAP)  # were a map sent anyway, the workers would have it now
        assert shared.healthz()[0] == 200
        unknown = shared.scrape().value("collector_unknown_vni_total")
        metrics = send_and_count(shared, seed_copies(30))
        assert metrics.value("collector_unknown_vni_total") == unknown  # still known
        assert {labels["session_id"] for labels, _ in
                metrics.find("collector_session_packets_total", vni=h.SEED_VNI)} == {h.SEED_SESSION_ID}
    finally:
        _restore(shared, original)


def test_refused_reload_is_counted_in_metrics(shared):
    """collector_session_reload_errors counts the supervisor's refusals (it once summed only
    the workers', which never refuse: the counter stayed 0)."""
    before = shared.scrape().value("collector_session_reload_errors_total")
    original, _ = _bad_reload(shared, "[[[")
    try:
        deadline = time.monotonic() + 2.5  # workers report every second
        while True:
            after = shared.scrape().value("collector_session_reload_errors_total")
            if after >= before + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after == before + 1
    finally:
        _restore(shared, original)


# -- start-up refusals: exit 2, one line, no traceback -----------------------------------------


def _startup_args(tmp_path, *extra) -> list:
    ports = h.Ports.pick()
    return ["--workers", "1", "--data", tmp_path / "data", "--min-free", "1M",
            "--listen", f"{h.LOOPBACK}:{ports.vxlan}",
            "--geneve-listen", f"{h.LOOPBACK}:{ports.geneve}",
            "--health", f"{h.LOOPBACK}:{ports.health}", *extra]


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


BAD_STARTS = {
    "negative-timeout": (lambda d: ["--idle-timeout", "-1"], {}, "command line: --idle-timeout: "),
    "zero-workers-env": (lambda d: [], {"COLLECTOR_WORKERS": "0"}, "environment: COLLECTOR_WORKERS: "),
    "packet-bytes": (lambda d: ["--packet-bytes", "9001"], {}, "--packet-bytes: "),
    "bad-listen": (lambda d: ["--listen", "127.0.0.1"], {}, "--listen: "),
    "unknown-key-in-config": (lambda d: ["--config", _write(d / "c.toml", "workers = 1\nbogus = 2\n")],
                              {}, "c.toml: unknown setting 'bogus'"),
    "bad-toml": (lambda d: ["--config", _write(d / "c.toml", "workers = \n")], {}, "line 1"),
    "missing-config": (lambda d: ["--config", d / "absent.toml"], {}, "absent.toml: cannot read"),
    "bad-sessions-json": (lambda d: ["--sessions", _write(d / "s.json", "{not json")], {}, "s.json"),
    "sessions-bad-vni": (lambda d: ["--sessions", _write(d / "s.json", json.dumps(
        h.sessions_document(dict(h.SEED_SESSION, VirtualNetworkId=-1))))], {}, "VirtualNetworkId"),
    "missing-sessions": (lambda d: ["--sessions", d / "absent.json"], {}, "absent.json"),
    "data-is-a-file": (lambda d: ["--data", _write(d / "datafile", "x")], {}, "data directory"),
    "infinite-idle-timeout": (lambda d: ["--idle-timeout", "inf"], {}, "--idle-timeout: "),
    # below: checked by their own tests
    "config-not-utf8": (lambda d: ["--config", _write(d / "c.toml", b"workers = 1\n# caf\xe9\n")],
                        {}, "c.toml"),
}
OWN_TESTS = ("config-not-utf8",)


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory) -> dict:
    """Every start-up refusal, run at once (each is a Python start-up that imports numpy and
    pyarrow: in parallel they take the time of a few)."""
    running = {}
    for case, (extra, env, _) in BAD_STARTS.items():
        directory = tmp_path_factory.mktemp(case)
        args = _startup_args(directory) + extra(directory)
        running[case] = h.spawn_serve(args, cwd=directory, env=env)
    # a refusal takes ~1 s (more with all at once on a busy machine); a start that is not
    # refused keeps running and is killed at the deadline
    deadline = time.monotonic() + 20
    return {case: h.finish(p, timeout=max(0.1, deadline - time.monotonic()))
            for case, p in running.items()}


@pytest.mark.parametrize("case", [c for c in BAD_STARTS if c not in OWN_TESTS])
def test_bad_start_exits_2_with_one_line(bad_starts, case):
    result, expected = bad_starts[case], BAD_STARTS[case][2]
    assert result.returncode is not None, "still running (killed): not refused at start\n" + \
        result.stderr[-1500:]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("collector serve: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""


def test_config_file_not_utf8_exits_2_with_one_line(bad_starts):
    """BUG: a --config file that is not UTF-8 makes tomllib raise UnicodeDecodeError, which
    config._read_toml does not catch: a traceback, exit 1 (test_config.py::test_toml_not_utf8)."""
    result = bad_starts["config-not-utf8"]
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("collector serve: ") and "c.toml" in result.stderr


# -- the data directory goes away and comes back ----------------------------------------------


def udp_phase(t: h.Traffic, third_octet: int, conversations: int = 5) -> None:
    t.add(item for i in range(conversations) for item in t.conversation(
        vni=100, ip_version=4, protocol=UDP, client=f"10.5.{third_octet}.{i + 1}",
        server="10.6.0.1", cport=60000 + i, sport=53, exchange=h.request_reply(4)))


def test_unwritable_data_directory_turns_health_503_and_loses_nothing(tmp_path):
    server = h.Server(tmp_path / "outage", extra=("--idle-timeout", "1"))
    phases = [h.Traffic() for _ in range(3)]
    for n, t in enumerate(phases):
        udp_phase(t, n)
    blocker = tmp_path / "outage" / "in-the-way"
    with server, h.Sender() as sender:
        server.wait_healthy()
        sent = sender.send_traffic(phases[0], server.ports)

        # the data directory moves away and a regular file takes its path (root ignores
        # chmod, so this is how the suite makes it unwritable)
        blocker.write_text("not a directory")
        h.exchange_paths(server.data, blocker)
        body = server.wait_health(503, timeout=5, reason="data directory")
        assert any(str(server.data) in r and "not writable" in r for r in body["reasons"])
        sent += sender.send_traffic(phases[1], server.ports)
        server.wait_received(sent)
        # the flows end (idle 1 s) and their flush fails: rows pending in the workers
        body = server.wait_health(503, timeout=12, reason="last flush failed")

        h.exchange_paths(server.data, blocker)
        blocker.unlink()
        server.wait_health(200, timeout=10)
        sent += sender.send_traffic(phases[2], server.ports)
        metrics = server.wait_received(sent)
        assert metrics.value("collector_datagrams_received_total") == sent
        assert metrics.value("collector_kernel_drops_total") == 0
        assert server.stop() == 0, server.log_tail()

    rows = connect(server.data).sql("""
        SELECT vni, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
               packets, bytes, rev_packets, rev_bytes
        FROM conversations""").fetchall()
    actual = {row[:7]: row[7:] for row in rows}
    expected = {}
    for t in phases:
        expected.update({k: (e.packets, e.bytes, e.rev_packets, e.rev_bytes)
                         for k, e in t.expected.items()})
    assert actual == expected
    assert "writing to" in server.stderr() and "failed" in server.stderr()


def test_sigterm_while_data_is_unwritable_does_not_report_success(tmp_path):
    """BUG: on SIGTERM each worker exports every flow and writes; when that last write fails
    (the data directory is gone or full), Worker._drain logs it and the worker still exits 0,
    and so does `collector serve`: flows are lost and the stop looks clean to systemd and
    to whoever checks. The exit status must say so (non-zero)."""
    server = h.Server(tmp_path / "lost")
    t = h.Traffic()
    udp_phase(t, 9)
    blocker = tmp_path / "lost" / "in-the-way"
    with server, h.Sender() as sender:
        server.wait_healthy()
        server.wait_received(sender.send_traffic(t, server.ports))
        blocker.write_text("not a directory")
        h.exchange_paths(server.data, blocker)
        server.wait_health(503, timeout=5, reason="data directory")
        code = server.stop()
    assert "writing to" in server.stderr(), server.log_tail()  # the workers knew
    assert code != 0, "flows were not written, yet collector serve exited 0\n" + server.log_tail(8)


# -- a worker killed with SIGKILL -------------------------------------------------------------


@dataclass
class Kill:
    server: h.Server
    before: h.Metrics
    killed: int
    unhealthy: dict  # the first 503 body after the kill
    during: h.Metrics | None  # a scrape whose collector_healthy was 0
    after: h.Metrics  # once healthy again
    pids_before: list
    pids_after: list


@pytest.fixture(scope="module")
def kill(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("kill")
    server = h.Server(workdir)
    with server:
        server.wait_healthy()
        pids = server.worker_pids()
        if len(pids) != server.workers:
            pytest.skip(f"cannot tell the worker processes from /proc (found {pids}); "
                        f"suggestion: expose each worker's pid in /healthz")
        send_and_count(server, seed_copies(400))
        before = server.scrape()
        os.kill(pids[0], signal.SIGKILL)
        unhealthy, during = None, None
        deadline = time.monotonic() + h.START_TIMEOUT
        while time.monotonic() < deadline:
            metrics = server.scrape()
            if during is None and metrics.value("collector_healthy") == 0:
                during = metrics
            status, body = server.healthz()
            if status == 503 and unhealthy is None:
                unhealthy = body
            if status == 200 and unhealthy is not None:
                break
            time.sleep(0.05)
        server.wait_healthy()
        after = server.scrape()
        result = Kill(server, before, pids[0], unhealthy, during, after, pids,
                      server.worker_pids())
        # the restarted worker receives its share again
        received = after.value("collector_datagrams_received_total")
        metrics = send_and_count(server, seed_copies(200))
        assert metrics.value("collector_datagrams_received_total") == received + 200
        yield result
        assert server.stop() == 0, server.log_tail()


def test_killed_worker_is_restarted_and_health_recovers(kill):
    assert kill.unhealthy is not None, "health never answered 503 after the kill"
    assert any(re.search(r"worker \d (is not running|is starting|has not reported)", r)
               for r in kill.unhealthy["reasons"]), kill.unhealthy
    assert kill.killed not in kill.pids_after and len(kill.pids_after) == 2
    assert set(kill.pids_after) & set(kill.pids_before)  # the other one was left alone
    assert f"(pid {kill.killed}) exited with -9: restarting it" in kill.server.stderr()
    assert kill.server.healthz()[0] == 200


def test_counters_do_not_go_back_when_a_worker_restarts(kill):
    """A restarted worker reports from 0: the summed counters must keep what its
    predecessor counted (they once dropped by it, which Prometheus reads as a reset)."""
    before = kill.before.value("collector_datagrams_received_total")
    after = kill.after.value("collector_datagrams_received_total")
    assert after >= before, f"collector_datagrams_received_total went from {before} to {after}"


def test_workers_up_counts_only_live_reporting_workers(kill):
    """While a worker is dead or restarting (health 503), collector_workers_up must not
    count it (it was once len(snapshots), stale snapshots included)."""
    assert kill.during is not None, "no /metrics scrape saw collector_healthy 0"
    assert kill.during.value("collector_workers_up") < 2


# -- a restarted worker and the sessions map in force ----------------------------------------


def test_restarted_worker_uses_the_sessions_map_in_force(tmp_path):
    """BUG: a (re)started worker loads the sessions files itself (`_worker_main`:
    SessionRegistry.load(config.sessions)) instead of receiving the supervisor's map. When the
    file on disk is bad (a reload was refused and the old map kept, or the file was edited
    without a reload), a worker that dies and is restarted raises SessionsError at start, is
    restarted again, and so on: a crash loop, health 503 for good. (With a good but edited
    file it silently uses a map the supervisor never loaded.)"""
    sessions = seed_sessions_copy(tmp_path)
    server = h.Server(tmp_path / "restart", sessions=(sessions,))
    with server:
        server.wait_healthy()
        pids = server.worker_pids()
        if len(pids) != server.workers:
            pytest.skip(f"cannot tell the worker processes from /proc (found {pids})")
        _, mark = _bad_reload(server, "{not json")  # refused: the seed map stays in force
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + h.START_TIMEOUT
        crashed, recovered = [], False
        while time.monotonic() < deadline and not (crashed or recovered):
            time.sleep(0.1)
            crashed = re.findall(r"worker \d \(pid \d+\) exited with 1\b.*", server.stderr()[mark:])
            live = server.worker_pids()
            recovered = (server.healthz()[0] == 200 and len(live) == 2 and pids[0] not in live)
        assert not crashed, ("the restarted worker could not load the sessions file itself:\n"
                             + "\n".join(crashed) + "\n" + server.log_tail(12))
        assert recovered, server.log_tail()
        unknown = server.scrape().value("collector_unknown_vni_total")
        metrics = send_and_count(server, seed_copies(100))
        assert metrics.value("collector_unknown_vni_total") == unknown  # the seed map, everywhere


# -- --check ---------------------------------------------------------------------------------


def test_check_validates_and_exits_0_without_binding(tmp_path):
    args = _startup_args(tmp_path, "--check", "--sessions", h.SEED_SESSIONS)
    result = h.run_serve(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("ok: "), result.stdout
    assert "workers = 1" in result.stdout and "min_free = 1048576" in result.stdout
    health = args[args.index("--health") + 1]
    with socket.socket() as sock:  # nothing was left bound
        sock.bind((h.LOOPBACK, int(health.rsplit(":", 1)[1])))


def test_check_refuses_a_busy_port(shared, tmp_path):
    args = _startup_args(tmp_path, "--check")
    args[args.index("--listen") + 1] = f"{h.LOOPBACK}:{shared.ports.vxlan}"
    result = h.run_serve(args, cwd=tmp_path)
    assert result.returncode == 2 and "ok:" not in result.stdout
    assert result.stderr.startswith("collector serve: --listen UDP ") and \
        len(result.stderr.splitlines()) == 1, result.stderr
    assert shared.healthz()[0] == 200


# -- IPv6 outer addresses ------------------------------------------------------------------------


def test_ipv6_listeners_and_health(tmp_path):
    """Every listener on [::1]: VXLAN and GENEVE over IPv6 UDP, health over IPv6 HTTP."""
    server = h.Server(tmp_path / "v6", host="::1")
    t = h.Traffic()
    t.interleave([t.conversation(vni=500, ip_version=4, protocol=TCP, client=f"10.7.0.{i + 1}",
                                 server="10.7.1.1", cport=45000 + i, sport=443,
                                 exchange=h.tcp_exchange(10)) for i in range(6)]
                 + [t.conversation(vni=501, ip_version=6, protocol=UDP, client=v6(f"fd00:7::{i + 1:x}"),
                                   server=v6("fd00:7::ff"), cport=46000 + i, sport=53,
                                   exchange=h.request_reply(4), listener="geneve")
                    for i in range(4)], random.Random(6))
    with server, h.Sender(host="::1") as sender:
        body = server.wait_healthy()
        assert body["status"] == "ok"
        with socket.create_connection(("::1", server.ports.health), timeout=3):
            pass
        sent = sender.send_traffic(t, server.ports)
        metrics = server.wait_received(sent)
        assert metrics.by_label("collector_datagrams_received_total", "listener") == t.by_listener()
        assert metrics.value("collector_datagrams_decoded_total") == sent
        assert metrics.value("collector_kernel_drops_total") == 0
        assert metrics.by_label("collector_socket_drops", "port") == {
            str(server.ports.vxlan): 0, str(server.ports.geneve): 0}
        assert server.stop() == 0, server.log_tail()
    rows = connect(server.data).sql("""
        SELECT vni, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
               packets, bytes, rev_packets, rev_bytes, end_reason
        FROM conversations""").fetchall()
    assert {row[:7]: row[7:] for row in rows} == {
        key: (e.packets, e.bytes, e.rev_packets, e.rev_bytes, "shutdown")
        for key, e in t.expected.items()}
