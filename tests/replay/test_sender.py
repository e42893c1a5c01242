"""Replays over loopback into a UDP socket the test binds: every datagram arrives, from the
source port of its flow, and decodes to its capture record; failures are counted, never lost.

Loopback only (127.0.0.1 and ::1); every replay here sends at most a few hundred datagrams.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter
from pathlib import Path

import pytest

from collector import build
from collector.capture import read_capture
from collector.decode import Packet, decode_datagram, decode_frame
from collector.decode.outer import outer_datagram
from collector.replay import ReplayError, ReplayOptions, replay
from collector.replay import sender as sender_module
from collector.replay.encap import Encapsulator
from collector.replay.sender import Sender, Target, parse_target, resolve_target

ROOT = Path(__file__).resolve().parents[2]
FULL = ROOT / "fixtures" / "full-session.pcap"
CURL = ROOT.parent / "shared" / "pcaps" / "mixed" / "arkime_curl-enabled-tls13.pcap"


class Sink:
    """A UDP socket on loopback that the replay sends to."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def drain(self, timeout: float = 0.3) -> list[tuple[bytes, int]]:
        """(payload, source port) of everything received, until `timeout` s of silence."""
        got = []
        self.sock.settimeout(timeout)
        try:
            while True:
                data, address = self.sock.recvfrom(65535)
                got.append((data, address[1]))
        except TimeoutError:
            return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def curl_capture() -> Path:
    if not CURL.is_file():
        pytest.skip(f"{CURL} is absent (the shared captures are not here)")
    return CURL


# -- targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:4789", ("127.0.0.1", 4789)),
    ("[::1]:6081", ("::1", 6081)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_target(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:0", "the port 1-65535"),
    ("127.0.0.1:65536", "the port 1-65535"),
    (":4789", "expected HOST:PORT"),
    ("::1:4789", "IPv6 address in brackets"),
    ("127.0.0.1:http", "expected HOST:PORT"),
])
def test_parse_target_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_target_prints_as_given():
    assert str(resolve_target("127.0.0.1:4789")) == "127.0.0.1:4789"
    assert str(Target("::1", 4789, socket.AF_INET6, ("::1", 4789, 0, 0))) == "[::1]:4789"


# -- replays over loopback --------------------------------------------------------------------


def want_ports(outers, summary):
    """(payload, source port) expected; None for a port the sender could not bind: a hashed
    port may be taken by another socket on the machine (49152-65535 overlaps the kernel's
    ephemeral range), and the sender then says so and uses a shared socket."""
    unbindable = summary.stats.unbindable
    return [(o.payload, None if o.src_port in unbindable else o.src_port) for o in outers]


def got_ports(got, outers, summary):
    bound = {o.src_port for o in outers} - summary.stats.unbindable
    return [(data, port if port in bound else None) for data, port in got]


def test_an_appliance_capture_as_captured_arrives_whole_from_its_ports(sink):
    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True))
    got = sink.drain()
    outers = [outer_datagram(r.linktype, r.data) for r in read_capture(FULL)]
    assert Counter(got_ports(got, outers, summary)) == Counter(want_ports(outers, summary))
    assert [data for data, _ in got] == [o.payload for o in outers]  # one socket: in order
    assert (summary.packets, summary.failed, summary.truncated) == (45, 0, 0)
    assert {decode_datagram(data, 4789).vni for data, _ in got} == {42, 43}


def test_a_plain_capture_arrives_as_vxlan_decoding_to_each_record(sink):
    path = curl_capture()
    records = list(read_capture(path))
    summary = replay([path], sink.target, ReplayOptions(vni=7159709, topspeed=True))
    got = sink.drain()
    assert len(got) == len(records) == summary.packets == 35
    encapsulator = Encapsulator(vni=7159709)
    for (data, port), rec in zip(got, records):
        assert data == build.vxlan(rec.data, vni=7159709)
        wanted = encapsulator.mirror(rec).source_port
        assert port == wanted or wanted in summary.stats.unbindable
        pkt = decode_datagram(data, 4789)
        want = Packet()
        decode_frame(rec.data, 0, len(rec.data), want)
        assert pkt.vni == 7159709
        assert (pkt.src_ip, pkt.dst_ip, pkt.ip_proto, pkt.src_port, pkt.dst_port, pkt.wire_len,
                pkt.tcp_flags) == (want.src_ip, want.dst_ip, want.ip_proto, want.src_port,
                                   want.dst_port, want.wire_len, want.tcp_flags)
    tcp_ports = {port for data, port in got if decode_datagram(data, 4789).ip_proto == 6}
    assert len(tcp_ports) == 1  # one TCP connection, both directions, one outer port
    # the TCP connection and one DNS exchange (A and AAAA from port 42060); the DNS replies
    # came from their own outer port: 3 ports bound
    assert summary.flows == 2 and summary.stats.ports_bound == 3


def test_packet_length_cuts_what_arrives(sink):
    path = curl_capture()
    summary = replay([path], sink.target, ReplayOptions(vni=1, packet_length=64, topspeed=True))
    got = sink.drain()
    lengths = [len(rec.data) for rec in read_capture(path)]
    assert [len(data) - 8 for data, _ in got] == [min(n, 64) for n in lengths]
    assert summary.truncated == sum(n > 64 for n in lengths)


def test_loop_and_limit(sink):
    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True, loop=3))
    assert len(sink.drain()) == 135 and summary.packets == 135 and summary.passes == 3
    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True, loop=0,
                                                        limit=50))
    assert len(sink.drain()) == 50 and summary.packets == 50 and summary.passes == 2
    assert summary.stopped == "the limit of 50 packets was reached"


def test_ipv6_target():
    try:
        s = Sink("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        summary = replay([FULL], s.target, ReplayOptions(as_captured=True, topspeed=True))
        assert len(s.drain()) == 45 and summary.packets == 45
        assert summary.bytes == sum(14 + 40 + 8 + len(outer_datagram(r.linktype, r.data).payload)
                                    for r in read_capture(FULL))
    finally:
        s.close()


def test_nothing_listening_counts_failures_and_refusals():
    """Connected sockets: the target's ICMP port unreachable makes the next send on the same
    socket fail with ECONNREFUSED (that datagram is counted failed), and the refusals are
    counted. Every datagram is sent or failed."""
    s = Sink()
    target = s.target
    s.close()  # nothing listens there now
    summary = replay([FULL], target, ReplayOptions(as_captured=True, topspeed=True))
    assert summary.packets + summary.failed == 45
    assert summary.failed > 0
    assert dict(summary.stats.errors) == {"ECONNREFUSED": summary.failed}
    assert summary.stats.refused >= summary.failed
    assert "The target refused datagrams" in summary.format()


def test_a_port_that_cannot_be_bound_falls_back_to_the_shared_socket(sink):
    records = list(read_capture(FULL))
    taken_port = outer_datagram(records[0].linktype, records[0].data).src_port
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blocker.bind(("0.0.0.0", taken_port))
    except OSError:
        blocker.close()
        pytest.skip(f"port {taken_port} is in use here already")
    try:
        summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True))
    finally:
        blocker.close()
    got = sink.drain()
    assert len(got) == 45 and summary.failed == 0
    expected = [outer_datagram(r.linktype, r.data).src_port for r in records]
    moved = [port for (_, port), want in zip(got, expected) if port != want]
    assert summary.stats.unbindable == {taken_port}
    assert len(moved) == expected.count(taken_port) == summary.stats.shared
    assert "1 source ports could not be bound" in summary.format()


def test_a_small_pool_evicts_and_still_sends_everything(sink):
    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True,
                                                        pool_size=2))
    got = sink.drain()
    outers = [outer_datagram(r.linktype, r.data) for r in read_capture(FULL)]
    assert got_ports(got, outers, summary) == want_ports(outers, summary)
    assert summary.stats.evicted > 0
    assert "sockets were closed to stay within the socket pool" in summary.format()


def test_pool_size_zero_sends_from_one_socket(sink):
    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, topspeed=True,
                                                        pool_size=0))
    assert len({port for _, port in sink.drain()}) == 1
    assert summary.stats.shared == 45 and summary.stats.ports_bound == 0


def test_the_capture_timing_is_followed_with_the_given_clock(sink):
    """A fake clock that only moves when the replay sleeps: the sleeps add up to the
    capture's span (17 ms between the first and last of the 45 records) over the multiplier."""
    now = [100.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, multiplier=2.0),
                     clock=lambda: now[0], sleep=sleep)
    assert len(sink.drain()) == 45
    timestamps = [r.timestamp_ns for r in read_capture(FULL)]
    span = (max(timestamps) - timestamps[0]) / 1e9
    assert sum(sleeps) == pytest.approx(span / 2)
    assert summary.seconds == pytest.approx(span / 2)


def test_duration_stops_before_a_datagram_due_after_it(sink):
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, pps=100, loop=0,
                                                        duration=0.2),
                     clock=lambda: now[0], sleep=sleep)
    assert summary.packets == 20 == len(sink.drain())  # due at 0.00, 0.01, ..., 0.19
    assert summary.stopped == "the duration of 0.2 s was over"


def test_a_pass_that_sends_nothing_ends_an_endless_loop(sink):
    plain = curl_capture()
    summary = replay([plain], sink.target, ReplayOptions(as_captured=True, loop=0, limit=10))
    assert summary.packets == 0 and summary.passes == 1
    assert summary.skipped == {"not a mirror datagram, and no VNI to encapsulate it": 35}
    assert "Skipped 35 records" in summary.format()


def test_a_target_that_does_not_resolve_is_a_replay_error():
    with pytest.raises(ReplayError, match="cannot resolve"):
        replay([FULL], "no-such-host.invalid:4789", ReplayOptions(as_captured=True))
    with pytest.raises(ReplayError, match="a target HOST:PORT is needed"):
        replay([FULL], None, ReplayOptions(as_captured=True))


# -- retries, with a socket that fails on purpose -------------------------------------------


class FlakySocket:
    """Raises the given errnos on the first sends, then takes everything."""

    def __init__(self, errors):
        self.errors, self.sent = list(errors), []

    def send(self, payload):
        if self.errors:
            raise OSError(self.errors.pop(0), "injected")
        self.sent.append(payload)
        return len(payload)

    def getsockopt(self, *args):
        return 0

    def close(self):
        pass


def flaky_sender(errors, sleeps):
    sender = Sender(resolve_target("127.0.0.1:9"), sleep=sleeps.append)
    flaky = FlakySocket(errors)
    sender._socket = lambda port: flaky
    return sender, flaky


def test_enobufs_is_retried_with_a_growing_backoff():
    sleeps = []
    sender, flaky = flaky_sender([errno.ENOBUFS, errno.EAGAIN], sleeps)
    assert sender.send(b"x", 50000)
    assert flaky.sent == [b"x"]
    assert sleeps == pytest.approx([50e-6, 100e-6])
    assert (sender.stats.sent, sender.stats.retried, sender.stats.failed) == (1, 1, 0)


def test_enobufs_that_persists_fails_the_datagram_after_the_retries():
    sleeps = []
    sender, _ = flaky_sender([errno.ENOBUFS] * 20, sleeps)
    assert not sender.send(b"x", 50000)
    assert len(sleeps) == 8 and sum(sleeps) < 0.02
    assert (sender.stats.sent, sender.stats.retried, sender.stats.failed) == (0, 1, 1)
    assert sender.stats.errors == {"ENOBUFS": 1}


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                  errno.EMSGSIZE, errno.EPERM])
def test_other_errors_fail_at_once_and_are_counted_by_name(code):
    sleeps = []
    sender, _ = flaky_sender([code], sleeps)
    assert not sender.send(b"x", 50000)
    assert sender.send(b"y", 50000)
    assert sleeps == []
    assert (sender.stats.sent, sender.stats.failed) == (1, 1)
    assert sender.stats.errors == {errno.errorcode[code]: 1}
    assert sender.stats.refused == (code == errno.ECONNREFUSED)


class FakeResource:
    RLIMIT_NOFILE, RLIM_INFINITY = 7, -1

    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if limits[0] > self.limits[1] != self.RLIM_INFINITY:
            raise ValueError("over the hard limit")
        self.limits = limits


def test_the_soft_open_files_limit_is_raised_toward_the_hard_one(monkeypatch):
    fake = FakeResource(1024, 100_000)
    monkeypatch.setattr(sender_module, "resource", fake)
    target = resolve_target("127.0.0.1:9")
    assert Sender(target, pool_size=4096).pool_size == 4096
    assert fake.limits == (4096 + 128, 100_000)
    low = FakeResource(256, 1024)
    monkeypatch.setattr(sender_module, "resource", low)
    assert Sender(target, pool_size=4096).pool_size == 1024 - 128
    assert low.limits == (1024, 1024)


def test_ctrl_c_stops_the_replay_with_its_summary(sink):
    now = [0.0]

    def sleep(seconds):
        if now[0] + seconds > 0.095:  # the 11th datagram of 100 pps is due at 0.1 s
            raise KeyboardInterrupt
        now[0] += seconds

    summary = replay([FULL], sink.target, ReplayOptions(as_captured=True, pps=100),
                     clock=lambda: now[0], sleep=sleep)
    assert summary.stopped == "interrupted"
    assert summary.packets == 10 == len(sink.drain())
    assert summary.format().endswith("Stopped: interrupted")
