"""The batch replay path (collector._fastio: pcap walk, flow keys, sendmmsg) against the
per-record path it stands in for: the same datagrams from the same ports in the same order,
the same summary; and `workers` splitting the flows over processes."""

from __future__ import annotations

import random
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import build, compiled
from collector.capture import CaptureError
from collector.replay import ReplayError, ReplayOptions, _conversation, replay
from collector.replay.encap import flow_of, source_port
from collector.replay.sender import Sender
from tests.replay.test_sender import Sink
from tests.test_replay_wire import CAPTURES, Recording, tool

pytestmark = pytest.mark.skipif(compiled.extension("_fastio") is None,
                                reason="collector._fastio is not built")


def _frames(rng: random.Random):
    """Frames of every kind the flow keys must either take or leave to flow_of."""
    addr4 = [f"10.{a}.{b}.1" for a in range(3) for b in range(3)]
    addr6 = [f"fd00::{a:x}" for a in range(1, 6)]
    for _ in range(400):
        kind = rng.randrange(12)
        body = bytes(rng.randrange(256) for _ in range(rng.choice((0, 10, 200, 1400))))
        sport, dport = rng.choice((1000, 40000, 443)), rng.choice((53, 443, 40000))
        src, dst = rng.sample(addr4, 2)
        if kind <= 2:
            yield build.ethernet(build.ipv4(build.tcp(body, sport=sport, dport=dport), src=src,
                                            dst=dst))
        elif kind <= 4:
            yield build.ethernet(build.ipv4(build.udp(body, sport=sport, dport=dport), src=src,
                                            dst=dst, proto=build.UDP))
        elif kind == 5:
            yield build.ethernet(build.ipv4(build.icmp(rng.choice((0, 8)), 0, body), src=src,
                                            dst=dst, proto=build.ICMP))
        elif kind == 6:
            s6, d6 = rng.sample(addr6, 2)
            yield build.ethernet(build.ipv6(build.tcp(body, sport=sport, dport=dport), src=s6,
                                            dst=d6), ethertype=build.ETH_IPV6)
        elif kind == 7:  # IPv6 with a hop-by-hop header: the slow path walks it
            s6, d6 = rng.sample(addr6, 2)
            yield build.ethernet(build.ipv6(build.udp(body, sport=sport, dport=dport),
                                            src=s6, dst=d6, next_header=build.UDP,
                                            extensions=[(0, bytes(6))]),
                                 ethertype=build.ETH_IPV6)
        elif kind == 8:  # a VLAN tag before IPv4
            frame = build.ethernet(build.ipv4(build.tcp(body, sport=sport), src=src, dst=dst))
            yield frame[:12] + b"\x81\x00\x00\x07" + frame[12:]
        elif kind == 9:  # a non-first fragment: no ports
            yield build.ethernet(build.ipv4(body or b"x" * 8, src=src, dst=dst, frag_offset=8))
        elif kind == 10:  # ARP-like, and a frame too short for an Ethernet header
            yield build.ethernet(bytes(28), ethertype=0x0806)
            yield b"\x01\x02\x03"
        else:  # an IPv4 header with options, TCP ports right after them
            yield build.ethernet(build.ipv4(build.tcp(body, sport=sport), src=src, dst=dst,
                                            options=b"\x01" * 4))


def _pcap(path: Path, frames, snaplen: int = 65535, cut: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        for i, frame in enumerate(frames):
            data = frame[:cut] if cut and i % 3 == 0 else frame
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(data), len(frame)) + data)
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    frames = list(_frames(random.Random(7)))
    return _pcap(tmp_path_factory.mktemp("fast") / "mixed.pcap", frames, cut=50)


def _run(path, monkeypatch, pure: bool, **options):
    """(summary, [(payload, source port or None from the shared socket)])"""
    monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "1" if pure else "0")
    shared_ports = set()
    close = Sender.close

    def close_noting_the_shared_port(self):
        if self._shared is not None:
            shared_ports.add(self._shared.getsockname()[1])
        close(self)
    monkeypatch.setattr(Sender, "close", close_noting_the_shared_port)
    sink = Sink()
    try:
        paths = path if isinstance(path, list) else [path]
        summary = replay(paths, sink.target, ReplayOptions(vni=7159709, topspeed=True,
                                                           **options))
        return summary, [(data, None if port in shared_ports else port)
                         for data, port in sink.drain()]
    finally:
        sink.close()


def _same_datagrams(first, second) -> bool:
    """Both replays' (payload, source port) lists equal, where a port counts as None when
    either replay could not bind it: a hashed port may be held by another socket on the
    machine at the time (the ephemeral range overlaps 49152-65535), and the sender then
    says so and sends from its shared socket, whose port is ephemeral."""
    (s1, got1), (s2, got2) = first, second
    unbindable = s1.stats.unbindable | s2.stats.unbindable

    def known(got):
        """port -> its datagrams in order: datagrams from different sockets may reach the
        sink in another order than sent (the loopback device queues them per CPU, and the
        sender may move between CPUs), those from one socket may not."""
        by_port = defaultdict(list)
        for data, port in got:
            by_port[port].append(data)
        for port in list(by_port):  # a port one replay could bind, the other not
            if port is not None and port in unbindable:
                by_port[None].extend(by_port.pop(port))
        if None in by_port:
            by_port[None].sort()
        return by_port
    return len(got1) == len(got2) and known(got1) == known(got2)


def _comparable(summary):
    stats = summary.stats
    return ([note for note in summary.notes() if "socket" not in note and "port" not in note],
            summary.packets, summary.bytes, summary.flows, summary.truncated,
            summary.cut_by_capture, summary.records, dict(summary.skipped), stats.sent,
            stats.failed)


@pytest.mark.parametrize("options", [{}, {"packet_length": 64}, {"loop": 2},
                                     {"limit": 123}, {"pool_size": 0}, {"pool_size": 5},
                                     {"batch": 37}, {"batch": 37, "limit": 150}])
def test_fast_path_sends_what_the_record_path_sends(mixed, monkeypatch, options):
    options = dict(options)
    if "batch" in options:  # batches smaller than the capture: their boundaries
        monkeypatch.setattr("collector.replay.BATCH", options.pop("batch"))
    fast = _run(mixed, monkeypatch, False, **options)
    slow = _run(mixed, monkeypatch, True, **options)
    assert _same_datagrams(fast, slow)  # payload and source port, in order per port
    assert _comparable(fast[0]) == _comparable(slow[0])
    assert fast[0].packets == len(fast[1]) > 100
    if not fast[0].stats.unbindable and not slow[0].stats.unbindable:
        assert fast[0].stats.shared == slow[0].stats.shared


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_fast_path_on_real_captures(capture, monkeypatch):
    fast = _run(capture, monkeypatch, False)
    slow = _run(capture, monkeypatch, True)
    assert _same_datagrams(fast, slow) and _comparable(fast[0]) == _comparable(slow[0])


def test_a_faulty_capture_sends_what_precedes_the_fault_then_raises_the_readers_error(
        mixed, tmp_path, monkeypatch):
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(mixed.read_bytes()[:-5])
    for pure in (False, True):
        monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "1" if pure else "0")
        sink = Sink()
        with pytest.raises(CaptureError, match="is cut") as error:
            replay([cut], sink.target, ReplayOptions(vni=1, topspeed=True))
        before_fault = list(_frames(random.Random(7)))[:-1]
        assert len(sink.drain()) == sum(len(frame) >= 14 for frame in before_fault)
        assert "packets were sent before it" in error.value.__notes__[0]
        sink.close()


def test_two_workers_send_every_flow_from_one_process_in_order(mixed, monkeypatch):
    one_summary, one = _run(mixed, monkeypatch, False)
    two_summary, two = _run(mixed, monkeypatch, False, workers=2)
    assert Counter(data for data, _ in one) == Counter(data for data, _ in two)
    port_of = dict(one)  # identical frames are one flow: one port
    unbindable = two_summary.stats.unbindable
    by_port_one, by_port_two = defaultdict(list), defaultdict(list)
    for data, port in one:
        by_port_one[port].append(data)
    for data, port in two:
        wanted = port_of[data]
        if port != wanted:  # a worker's shared socket (the forked workers' are not noted)
            assert wanted is None or wanted in unbindable, (port, wanted)
            continue
        by_port_two[port].append(data)
    for port, datagrams in by_port_two.items():  # each flow's datagrams in their order
        assert port is None or datagrams == by_port_one[port]
    assert len(by_port_two) > 200
    assert _comparable(two_summary)[1:] == _comparable(one_summary)[1:]


def test_workers_refuse_what_they_cannot_split():
    with pytest.raises(ReplayError, match="--limit"):
        ReplayOptions(vni=1, topspeed=True, workers=2, limit=5)
    with pytest.raises(ReplayError, match="--pps"):
        ReplayOptions(vni=1, pps=100, workers=2)
    with pytest.raises(ReplayError, match="workers"):
        ReplayOptions(vni=1, workers=0)


def test_the_same_wire_bytes_with_and_without_fastio(tmp_path, monkeypatch):
    """tcpdump on lo records both replays; the UDP datagrams (ports, length, payload) are
    the same (IP ids and checksums are the kernel's, not ours). Few datagrams: at top speed
    tcpdump would drop some."""
    tool("tcpdump")
    mixed = _pcap(tmp_path / "few.pcap", list(_frames(random.Random(11)))[:60], cut=50)
    sink = Sink()
    try:
        recorded, taken = [], set()
        for pure in (False, True):
            monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "1" if pure else "0")
            directory = tmp_path / str(pure)
            directory.mkdir()
            recording = Recording(directory, sink.port).start()
            summary = replay([mixed], sink.target, ReplayOptions(vni=5, topspeed=True))
            log = recording.stop()
            assert f"\n{summary.packets} packets captured" in f"\n{log}", log
            recorded.append(_udp_datagrams(recording.path))
            taken |= summary.stats.unbindable
            sink.drain(0.05)
        if taken:
            # A source port another process held at that moment (the full suite runs beside
            # servers and senders) went from a shared socket with a kernel-chosen port: the
            # rest of each datagram must still be the same.
            recorded = [[d[2:] for d in run] for run in recorded]
        assert sorted(recorded[0]) == sorted(recorded[1]) and len(recorded[0]) > 40
    finally:
        sink.close()


def _udp_datagrams(path: Path) -> list[bytes]:
    """The UDP header and payload of every IPv4 packet of a tcpdump capture of lo (Ethernet
    link type there), the UDP checksum zeroed (loopback leaves it partial)."""
    data = path.read_bytes()
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    pos, out = 24, []
    while pos + 16 <= len(data):
        caplen = struct.unpack_from(order + "I", data, pos + 8)[0]
        frame = data[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        l3 = 14
        ihl = (frame[l3] & 0x0F) * 4
        udp = bytearray(frame[l3 + ihl:])
        udp[6:8] = b"\0\0"
        out.append(bytes(udp))
    return out


def test_a_target_with_nothing_listening_is_never_silent_on_either_path(mixed, monkeypatch):
    """Nothing listening: ICMP port unreachable makes a later send on the same socket fail
    with ECONNREFUSED. Within one sendmmsg call the kernel reports it only to the next call,
    so the batch path counts fewer failures than one send per datagram does, but the
    refusal is still counted and said (sent + failed = all, failures by errno)."""
    for pure in (False, True):
        monkeypatch.setenv("COLLECTOR_PURE_PYTHON", "1" if pure else "0")
        sink = Sink()
        target = sink.target
        sink.close()
        summary = replay([mixed], target, ReplayOptions(vni=3, topspeed=True, pool_size=0))
        assert summary.packets + summary.failed == 400
        assert dict(summary.stats.errors) == ({"ECONNREFUSED": summary.failed}
                                              if summary.failed else {})
        assert summary.stats.refused >= max(summary.failed, 1)
        assert "The target refused datagrams" in summary.format()
        if pure:
            assert summary.failed > 0


@pytest.mark.parametrize("pool_size", [5, 4096])
def test_files_of_both_paths_in_one_replay_share_the_pool(mixed, tmp_path, monkeypatch,
                                                           pool_size):
    """A raw-IP capture (LINKTYPE_RAW: the per-record path) between two runs of the batch
    path: the socket pool's LRU order carries over both ways."""
    raw = tmp_path / "raw.pcap"
    frames = [f[14:] for f in _frames(random.Random(3)) if f[12:14] == b"\x08\x00"]
    with open(raw, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame)
    results = [_run([mixed, raw, mixed], monkeypatch, pure, pool_size=pool_size)
               for pure in (False, True)]
    assert _same_datagrams(*results)
    assert _comparable(results[0][0]) == _comparable(results[1][0])
    assert results[0][0].packets == 2 * 400 + len(frames)


@st.composite
def _any_frame(draw):
    """A frame flow_keys may take: TCP, UDP or ICMP over IPv4 or IPv6 with drawn addresses,
    ports and types (both orders of the TCP endpoints), or drawn bytes after an IP ethertype."""
    if draw(st.booleans()):
        ethertype = draw(st.sampled_from((0x0800, 0x86DD, 0x0806)))
        return bytes(12) + ethertype.to_bytes(2, "big") + draw(st.binary(max_size=80))
    v6 = draw(st.booleans())
    size = 16 if v6 else 4
    src, dst = draw(st.binary(min_size=size, max_size=size)), draw(
        st.binary(min_size=size, max_size=size))
    if draw(st.booleans()):  # the same address both ways: the ports decide the TCP order
        dst = src
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    proto = draw(st.sampled_from((build.TCP, build.UDP, build.ICMP, build.ICMPV6, 47)))
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + draw(st.binary(max_size=24))
    if v6:
        ip = (b"\x60" + bytes(3) + len(l4).to_bytes(2, "big") + bytes((proto, 64)) + src + dst)
        return bytes(12) + b"\x86\xdd" + ip + l4
    ip = bytes((0x45, 0)) + (20 + len(l4)).to_bytes(2, "big") + bytes(4) + bytes((64, proto))
    return bytes(12) + b"\x08\x00" + ip + bytes(2) + src + dst + l4


def _reversed(frame: bytes) -> bytes:
    """The frame with its IP addresses and its first two 16-bit L4 fields (the ports) swapped,
    as the other direction of its flow sends it (no IP options: as `_any_frame` makes them)."""
    if frame[12:14] == b"\x08\x00" and len(frame) >= 38:
        src, dst, l4 = slice(26, 30), slice(30, 34), 34
    elif frame[12:14] == b"\x86\xdd" and len(frame) >= 58:
        src, dst, l4 = slice(22, 38), slice(38, 54), 54
    else:
        return frame
    out = bytearray(frame)
    out[src], out[dst] = frame[dst], frame[src]
    out[l4:l4 + 2], out[l4 + 2:l4 + 4] = frame[l4 + 2:l4 + 4], frame[l4:l4 + 2]
    return bytes(out)


@given(frames=st.lists(_any_frame(), min_size=1, max_size=20))
@settings(max_examples=300, deadline=None)
def test_source_ports_and_conversations_of_flow_keys_are_the_encapsulators(frames):
    """collector._fastio.source_ports on flow_keys rows gives source_port(flow_of(frame)),
    and -1 only for the rows flow_keys leaves to flow_of (all zeros); the conversation read
    off a row is the flow's symmetric key."""
    fast = compiled.extension("_fastio")
    frames = frames + [_reversed(frame) for frame in frames]  # both directions: one id
    data = b"".join(frames)
    lengths = np.array([len(f) for f in frames], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    keys = np.zeros((len(frames), 40), np.uint8)
    fast.flow_keys(data, offsets, lengths, keys)
    ports, ids = np.empty(len(frames), np.int64), np.empty(len(frames), np.int64)
    fast.source_ports(keys, ports, ids)
    id_of = {}
    for frame, key, port, conversation_id in zip(frames, keys, ports, ids):
        if not key.any():
            assert port == -1
        else:
            assert port == source_port(flow_of(frame))
            conversation = flow_of(frame).symmetric_key()
            assert _conversation(key.tobytes()) == conversation
            assert id_of.setdefault(conversation, conversation_id) == conversation_id


def test_the_set_of_flows_sent_grows_and_never_merges_colliding_keys(monkeypatch):
    """_KnownKeys over collector._fastio.flows_seen: each key is new once, however many
    times and batches it comes; keys sharing a hash stay two flows; the table grows past
    3/4 full without losing a key, and starts over (reporting keys anew) at its bound."""
    from collector import replay as module
    known = module._KnownKeys(compiled.extension("_fastio"))
    rng = np.random.default_rng(5)
    keys = np.zeros((6000, 40), np.uint8)
    keys[:, 0], keys[:, 1] = 4, 6
    keys[:, 6:10] = rng.integers(0, 256, (6000, 4))
    keys[:, 2:6] = np.arange(6000, dtype=">u4").view(np.uint8).reshape(-1, 4)
    hashes = np.arange(1, 6001, dtype=np.uint64)
    hashes[1::2] = hashes[0::2]  # pairs of keys with one hash: a collision each
    seen = known.first_seen(keys, hashes, np.arange(3000))
    assert len(seen) == 3000 and len(set(seen)) == 3000  # every key new, none merged
    assert known.first_seen(keys, hashes, np.arange(3000)[::-1]) == []  # seen, any order
    again = known.first_seen(keys, hashes, np.arange(6000))  # 3000 more: grows past 4096
    assert len(again) == 3000 and len(known.hashes) >= 8192 and known.stored == 6000
    monkeypatch.setattr(module, "_TABLE_BYTES", 4096 * 40)  # at the bound: start over
    bounded = module._KnownKeys(compiled.extension("_fastio"))
    assert len(bounded.first_seen(keys, hashes, np.arange(6000))) == 6000
    assert len(bounded.hashes) == 4096 and bounded.stored == 6000 - 3072
    assert len(bounded.first_seen(keys, hashes, np.arange(3072))) == 3072  # forgotten: anew


@given(datagrams=st.lists(st.tuples(st.integers(-1, 12), st.integers(0, 12)), max_size=300))
@settings(max_examples=300, deadline=None)
def test_group_by_fd_keeps_each_sockets_and_each_conversations_order(datagrams):
    """The permutation keeps every fd's and every conversation's datagrams in order; with
    every conversation on one fd it is the stable sort on each fd's first position."""
    fast = compiled.extension("_fastio")
    fds = np.array([fd for fd, _ in datagrams], np.int64)
    conversations = np.array([c for _, c in datagrams], np.int64)
    order = np.empty(len(fds), np.int64)
    fast.group_by_fd(fds, conversations, order)
    assert sorted(order.tolist()) == list(range(len(fds)))
    for values in (fds, conversations):
        for value in set(values.tolist()):
            picked = [i for i in order.tolist() if values[i] == value]
            assert picked == sorted(picked)
    fast.group_by_fd(fds, fds, order)  # a conversation per fd: one window
    first = {}
    for i, fd in enumerate(fds.tolist()):
        first.setdefault(fd, i)
    assert order.tolist() == sorted(range(len(fds)), key=lambda i: first[int(fds[i])])
