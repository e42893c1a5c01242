"""What `collector replay` puts on the wire, as tcpdump records it on loopback and tshark
reads it: VXLAN flags 0x08 and the session's VNI; GWLB GENEVE with the AWS option class
0x0108 (types 1, 2, 3: endpoint id, attachment id, flow cookie) around VXLAN with the VNI;
one outer UDP source port for every packet of an inner TCP flow, both directions.

The test starts tcpdump (`tcpdump -i lo -w FILE udp port P`) itself and stops it after the
replay; the replay goes to a UDP socket the test binds on 127.0.0.1:P. Without tcpdump or
tshark (or without the right to capture) the tests skip with the reason; under
COLLECTOR_REQUIRE_REFERENCE=1 (CI) they fail instead. Captures: fixtures/plain-mixed.pcap,
plus TCP-rich captures of ../shared/pcaps when present.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from collector.replay import ReplayOptions, replay
from tests.pcaps import PCAPS_DIR, unavailable

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="captures on the Linux loopback interface")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CAPTURES = [FIXTURES / "plain-mixed.pcap"] + [
    path for path in (PCAPS_DIR / "mixed" / "arkime_curl-enabled-tls13.pcap",
                      PCAPS_DIR / "mixed" / "zeek_wikipedia.pcap",
                      PCAPS_DIR / "ipv6" / "suricata_community-id-ipv6.pcap",
                      PCAPS_DIR / "linktype" / "tcpdump_tcp-handshake-nano-sll.pcap")
    if path.is_file()]
PPS = 5000  # paced: tcpdump writes every packet as it comes (-U), and must keep up
FIELDS = ("frame.number", "udp.srcport", "udp.dstport", "udp.length", "vxlan.flags",
          "vxlan.vni", "geneve.vni", "geneve.option.class", "geneve.option.type", "ip.src",
          "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
    return path


@pytest.fixture
def sink():
    """The replay target: a bound UDP socket (so that nothing answers port unreachable)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


class Recording:
    """tcpdump on lo for one UDP port, from `start` to `stop`."""

    def __init__(self, directory: Path, port: int) -> None:
        self.path = directory / f"lo-{port}.pcap"
        self.log = directory / f"tcpdump-{port}.log"
        self.argv = [tool("tcpdump"), "-i", "lo", "-w", str(self.path), "-U",
                     "--immediate-mode", "-B", "32768", "-n", "udp", "port", str(port)]
        if os.geteuid() == 0:
            self.argv[1:1] = ["-Z", "root"]  # do not switch to a user who cannot write here
        self.process = None

    def start(self) -> Recording:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None:
                unavailable(f"tcpdump cannot capture on lo: {self.log.read_text().strip()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"tcpdump did not start listening: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> str:
        time.sleep(0.2)  # the last packets reach tcpdump's buffer
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail("tcpdump did not stop on SIGINT")
        return self.log.read_text(errors="replace")


def dissect(path: Path, port: int, protocol: str) -> list[dict[str, list[str]]]:
    """tshark's fields of every packet (every occurrence, outermost first)."""
    argv = [tool("tshark"), "-r", str(path), "-n", "-d", f"udp.port=={port},{protocol}",
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for name in FIELDS:
        argv += ["-e", name]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    packets = []
    for line in result.stdout.splitlines():
        values = line.split("\t")
        packets.append({name: value.split(",") if value else []
                        for name, value in zip(FIELDS, values + [""] * len(FIELDS))})
    return packets


def record_replays(tmp_path: Path, port: int, replays) -> tuple[list, list]:
    """Replay (capture, options) pairs to 127.0.0.1:port under tcpdump; returns the
    summaries and the packets tcpdump recorded, as tshark reads them."""
    recording = Recording(tmp_path, port).start()
    summaries = []
    try:
        for capture, options in replays:
            summaries.append(replay([capture], f"127.0.0.1:{port}", options))
    finally:
        log = recording.stop()
    sent = sum(s.packets for s in summaries)
    assert all(s.failed == 0 for s in summaries), [s.format() for s in summaries]
    assert f"\n{sent} packets captured" in f"\n{log}", log
    assert "\n0 packets dropped by kernel" in log, log
    return summaries, recording.path


def inner_tcp_flows(packets) -> dict[tuple, dict[bool, set[int]]]:
    """{(vni, low endpoint, high endpoint): {sent by the low endpoint: outer source ports}}
    for every packet with an inner TCP header."""
    flows: dict[tuple, dict[bool, set[int]]] = defaultdict(lambda: defaultdict(set))
    for p in packets:
        if not p["tcp.srcport"]:
            continue
        inner6 = bool(p["ipv6.src"])
        src = (p["ipv6.src"] if inner6 else p["ip.src"])[-1], int(p["tcp.srcport"][-1])
        dst = (p["ipv6.dst"] if inner6 else p["ip.dst"])[-1], int(p["tcp.dstport"][-1])
        low, high = sorted((src, dst))
        flows[(int(p["vxlan.vni"][-1]), low, high)][src == low].add(int(p["udp.srcport"][0]))
    return flows


def check_tcp_source_ports(packets) -> None:
    flows = inner_tcp_flows(packets)
    assert flows
    both_ways = 0
    for key, ports in flows.items():
        seen = set().union(*ports.values())
        assert len(seen) == 1, f"inner TCP flow {key}: outer source ports {ports}"
        assert 49152 <= seen.pop() <= 65535
        both_ways += len(ports) == 2
    assert both_ways >= 1  # a flow seen in both directions kept one port


def test_vxlan_on_the_wire(tmp_path, sink):
    replays = []
    for number, capture in enumerate(CAPTURES):
        replays.append((capture, ReplayOptions(vni=7_000_000 + number, pps=PPS)))
        # the same capture cut as a PacketLength 64 session sends it, under another VNI
        replays.append((capture, ReplayOptions(vni=7_100_000 + number, packet_length=64,
                                               pps=PPS)))
    summaries, path = record_replays(tmp_path, sink, replays)
    packets = dissect(path, sink, "vxlan")
    assert len(packets) == sum(s.packets for s in summaries)
    assert Counter(int(p["vxlan.vni"][0]) for p in packets) == {
        options.vni: s.packets for (_, options), s in zip(replays, summaries)}
    for p in packets:
        assert p["vxlan.flags"] == ["0x0800"], p  # only the I flag: 08 00 00 00 | VNI | 00
        assert int(p["udp.dstport"][0]) == sink
        if int(p["vxlan.vni"][0]) >= 7_100_000:  # 8 UDP + 8 VXLAN + at most 64 frame bytes
            assert int(p["udp.length"][0]) <= 8 + 8 + 64, p
    check_tcp_source_ports([p for p in packets if int(p["vxlan.vni"][0]) < 7_100_000])


def test_gwlb_geneve_on_the_wire(tmp_path, sink):
    replays = [(capture, ReplayOptions(vni=7_200_000 + number, encap="geneve", pps=PPS))
               for number, capture in enumerate(CAPTURES)]
    summaries, path = record_replays(tmp_path, sink, replays)
    packets = dissect(path, sink, "geneve")
    assert len(packets) == sum(s.packets for s in summaries)
    # the session VNI is the inner VXLAN's (GENEVE's own is the GWLB's, 0)
    assert Counter(int(p["vxlan.vni"][0]) for p in packets) == {
        options.vni: s.packets for (_, options), s in zip(replays, summaries)}
    for p in packets:
        assert [int(v, 0) for v in p["geneve.option.class"]] == [0x0108] * 3, p
        assert [int(v, 0) for v in p["geneve.option.type"]] == [1, 2, 3], p
        assert p["vxlan.flags"] == ["0x0800"], p
        # outer UDP to the GENEVE port, then the VXLAN datagram's UDP to 4789 inside
        assert [int(v) for v in p["udp.dstport"][:2]] == [sink, 4789], p
    check_tcp_source_ports(packets)
