"""Socket activation (deploy/collector.socket): which sockets systemd passed, and their set-up.
The end-to-end proof (a killed service, 2 s down, nothing lost meanwhile) is in
tests/serve/test_faults.py::test_socket_activation_keeps_what_arrives_while_the_service_is_down."""

from __future__ import annotations

import os
import socket

import pytest

from collector.serve import activation
from collector.serve.config import Address
from collector.serve.receiver import SO_TIMESTAMPNS


def bound(reuseport: bool = True, family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def test_variables_for_another_process_are_ignored_and_removed():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "X": "1"}
    assert activation.inherited_datagram_sockets(env) == []
    assert env == {"X": "1"}  # a worker, or anything started later, must not take them
    assert activation.inherited_datagram_sockets({}) == []


def test_a_count_that_is_not_one_is_refused():
    with pytest.raises(activation.ActivationError, match="LISTEN_FDS"):
        activation.inherited_datagram_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


def test_take_picks_the_socket_of_the_address_and_sets_it_up():
    v4, other, v6 = bound(), bound(), bound(family=socket.AF_INET6, host="::1")
    sockets = [v4, other, v6]
    try:
        port = v4.getsockname()[1]
        assert activation.take(sockets, Address("127.0.0.1", port + 1 if port < 65535 else 1),
                               1 << 20, "--listen", 2) is None
        got = activation.take(sockets, Address("127.0.0.1", port), 1 << 20, "--listen", 2)
        assert got is v4 and sockets == [other, v6]
        assert got.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS) == 1 and not got.getblocking()
        six = activation.take(sockets, Address("::1", v6.getsockname()[1]), 1 << 20, "--listen", 1)
        assert six is v6
    finally:
        for sock in (v4, other, v6):
            sock.close()


def test_without_reuseport_more_workers_cannot_join():
    lone = bound(reuseport=False)
    try:
        address = Address("127.0.0.1", lone.getsockname()[1])
        with pytest.raises(activation.ActivationError, match="ReusePort=yes"):
            activation.take([lone], address, 1 << 20, "--listen", 2)
        assert activation.take([lone], address, 1 << 20, "--listen", 1) is lone  # one worker: fine
    finally:
        lone.close()
