"""The socket layer on its own: batched receive into slots, lengths, drops."""

import socket

import pytest

from collector.serve.config import Address
from collector.serve.receiver import Receiver, open_listener


@pytest.fixture
def listener():
    sock, _ = open_listener(Address("127.0.0.1", 0), 4096)  # a tiny buffer: it overflows
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield sock, sender, ("127.0.0.1", sock.getsockname()[1])
    sock.close()
    sender.close()


def test_rows_keep_the_first_bytes_and_the_real_length(listener):
    sock, sender, address = listener
    sender.sendto(b"a" * 100, address)
    sender.sendto(b"b" * 10, address)
    receiver = Receiver(sock, rows=8, width=32)
    assert receiver.receive(now_ns=1) == 2
    assert receiver.lengths[:2].tolist() == [100, 10]
    assert bytes(receiver.buf[0]) == b"a" * 32 and bytes(receiver.buf[1, :10]) == b"b" * 10
    assert all(ts > 1_000_000_000 * 1_000_000_000 for ts in receiver.ts[:2])  # kernel time, ns
    assert (receiver.datagrams, receiver.bytes, receiver.receive(now_ns=1)) == (2, 110, 0)


def test_drops_are_known_before_the_next_datagram_arrives(listener):
    sock, sender, address = listener
    for _ in range(300):
        sender.sendto(b"x" * 1000, address)
    receiver = Receiver(sock, rows=512, width=64)
    received = receiver.receive(now_ns=0)
    assert received + receiver.kernel_drops == 300 and receiver.kernel_drops > 0
