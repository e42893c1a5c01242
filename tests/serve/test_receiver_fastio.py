"""The compiled receive path (recvmmsg in collector._fastio) against the recvmsg_into fallback,
over real loopback sockets: the same datagrams, lengths, truncation, timestamps and drops."""

import socket
import time

import numpy as np
import pytest

from collector import compiled
from collector.serve.config import Address
from collector.serve.receiver import Receiver, open_listener

pytestmark = pytest.mark.skipif(compiled.extension("_fastio") is None,
                                reason="collector._fastio is not built")

SIZES = [0, 1, 31, 32, 33, 100, 1400, 9000, 65507, 64, 7]


def _pair(rcvbuf: int):
    """Two listeners, one per implementation, and a sender that gives both the same input."""
    socks = [open_listener(Address("127.0.0.1", 0), rcvbuf)[0] for _ in range(2)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return socks, sender


def _send_both(sender, socks, payloads):
    for payload in payloads:
        for sock in socks:
            sender.sendto(payload, ("127.0.0.1", sock.getsockname()[1]))


def _drain(receiver):
    """Every queued datagram as (row bytes, length, truncated, timestamp)."""
    got = []
    while rows := receiver.receive(now_ns=1):
        width = receiver.buf.shape[1]
        for i in range(rows):
            length = int(receiver.lengths[i])
            got.append((bytes(receiver.buf[i, :min(length, width)]), length,
                        bool(receiver.truncated[i]), int(receiver.ts[i])))
    return got


def test_same_datagrams_lengths_and_truncation():
    socks, sender = _pair(8 << 20)
    try:
        payloads = [bytes((n + i) % 256 for i in range(n)) for n in SIZES] * 3
        before = time.time_ns()
        _send_both(sender, socks, payloads)
        fast = _drain(Receiver(socks[0], rows=4, width=32, fastio=True))
        slow = _drain(Receiver(socks[1], rows=4, width=32, fastio=False))
        assert [g[:3] for g in fast] == [g[:3] for g in slow]
        assert [(p[:32], len(p), len(p) > 32) for p in payloads] == [g[:3] for g in fast]
        # kernel receive times, in order, not the stand-in `now_ns`
        for got in (fast, slow):
            stamps = [g[3] for g in got]
            assert stamps == sorted(stamps) and stamps[0] >= before - 10**9
    finally:
        for sock in socks + [sender]:
            sock.close()


def test_counters_and_rows_beyond_the_batch_are_untouched():
    socks, sender = _pair(1 << 20)
    try:
        _send_both(sender, socks, [b"x" * 50] * 5)
        for sock, fastio in zip(socks, (True, False)):
            receiver = Receiver(sock, rows=3, width=64, fastio=fastio)
            receiver.lengths[:] = -7
            assert receiver.receive(now_ns=1) == 3
            assert receiver.lengths.tolist() == [50, 50, 50]
            assert receiver.receive(now_ns=1) == 2 and receiver.lengths[2] == 50
            assert (receiver.datagrams, receiver.bytes, receiver.receive(now_ns=1)) == (5, 250, 0)
    finally:
        for sock in socks + [sender]:
            sock.close()


def test_same_drop_counts_from_both_paths():
    socks, sender = _pair(4096)  # a tiny buffer: most of the burst is dropped
    try:
        _send_both(sender, socks, [b"y" * 1000] * 300)
        receivers = [Receiver(sock, rows=512, width=64, fastio=fastio)
                     for sock, fastio in zip(socks, (True, False))]
        received = [r.receive(now_ns=0) for r in receivers]
        drops = [r.kernel_drops for r in receivers]
        assert received[0] == received[1] and drops[0] == drops[1] > 0
        assert received[0] + drops[0] == 300
        # SO_RXQ_OVFL comes with the next datagram queued: both paths read the same counter
        _send_both(sender, socks, [b"z"])
        assert [r.receive(now_ns=0) for r in receivers] == [1, 1]
        assert receivers[0]._overflow_drops == receivers[1]._overflow_drops == drops[0]
    finally:
        for sock in socks + [sender]:
            sock.close()


def test_bad_arguments_are_refused_not_written_past():
    fastio = compiled.extension("_fastio")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        slab = np.zeros((4, 8), np.uint8)
        with pytest.raises(ValueError):
            fastio.recv_batch(sock.fileno(), slab, np.zeros(2, np.int64), np.zeros(4, np.int64),
                              np.zeros(4, np.uint8), 0)
        with pytest.raises(ValueError):
            fastio.recv_batch(sock.fileno(), np.zeros(32, np.uint8), np.zeros(4, np.int64),
                              np.zeros(4, np.int64), np.zeros(4, np.uint8), 0)
        with pytest.raises(ValueError):
            fastio.send_batch(sock.fileno(), b"abc", np.array([2], np.int64),
                              np.array([5], np.int64))
    finally:
        sock.close()
