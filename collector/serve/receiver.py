"""The one layer that touches sockets: UDP listeners and batched receive into slots.

Each datagram lands in one row of a numpy array (`decode_batch`'s input) with its real length
(MSG_TRUNC: a row keeps only its first bytes, the length stays true), the kernel's receive
timestamp (SO_TIMESTAMPNS) and the socket's cumulative drop counter (SO_RXQ_OVFL).

With the compiled `collector._fastio` a batch is one recvmmsg(2) call (up to `rows`
datagrams, the GIL released); without it (no compiler, COLLECTOR_PURE_PYTHON=1) one
recvmsg_into per datagram fills the same arrays the same way: the tests compare the two.
"""

from __future__ import annotations

import errno
import socket
import struct

import numpy as np

from collector import compiled
from collector.serve.config import Address

# Linux values; older Pythons do not export them.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO_DROPS = 8  # SK_MEMINFO_DROPS: the index of the drop counter in SO_MEMINFO
_TIMESPEC = struct.Struct("@qq")
_U32 = struct.Struct("@I")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_U32.size)


def port_free(address: Address, kind: int = socket.SOCK_DGRAM) -> None:
    """Raise OSError(EADDRINUSE) when something already listens on `address`.

    Bound without SO_REUSEPORT, so that a second collector (whose sockets would otherwise
    join our SO_REUSEPORT group and take half the traffic) is refused.
    """
    probe = socket.socket(address.family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((address.host, address.port))
    finally:
        probe.close()


def open_listener(address: Address, rcvbuf: int) -> tuple[socket.socket, int]:
    """A non-blocking UDP socket in the SO_REUSEPORT group of `address`, with kernel receive
    timestamps and drop counts; returns it and the receive buffer the kernel granted."""
    sock = socket.socket(address.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:  # root (CAP_NET_ADMIN) may exceed net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux doubles it
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind((address.host, address.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, granted


class Receiver:
    """Receives batches of datagrams from one socket into fixed-width rows.

    After `receive` returned n, rows [:n] of `buf`, `lengths` (the real datagram lengths),
    `ts` (kernel receive times, ns) and `truncated` (the datagram was longer than its row)
    describe the batch. `fastio` picks the implementation: None asks `collector.compiled`,
    False forces the pure-Python one (tests and benchmarks compare them).
    """

    def __init__(self, sock: socket.socket, rows: int, width: int, *,
                 fastio: bool | None = None) -> None:
        self.sock = sock
        self.buf = np.zeros((rows, width), dtype=np.uint8)
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.ts = np.zeros(rows, dtype=np.int64)
        self.truncated = np.zeros(rows, dtype=np.bool_)
        self._fastio = compiled.extension("_fastio") if fastio is not False else None
        if fastio and self._fastio is None:
            raise RuntimeError("collector._fastio is not built (or COLLECTOR_PURE_PYTHON is set)")
        self._views = [memoryview(self.buf[i]) for i in range(rows)]
        self._overflow_drops = 0  # cumulative, from SO_RXQ_OVFL
        self.datagrams = 0
        self.bytes = 0

    @property
    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on this socket. SO_RXQ_OVFL only reports drops with
        the next datagram queued, so the last burst before a pause would go uncounted: the
        socket's own drop counter (SO_MEMINFO, Linux 3.x+) is exact, and read when asked."""
        try:
            info = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (_MEMINFO_DROPS + 1))
        except OSError:
            return self._overflow_drops
        if len(info) < 4 * (_MEMINFO_DROPS + 1):
            return self._overflow_drops
        return max(self._overflow_drops, _U32.unpack_from(info, 4 * _MEMINFO_DROPS)[0])

    def receive(self, now_ns: int) -> int:
        """Fill rows until the socket is empty or the batch is full; returns the rows filled.
        `now_ns` stands in for a datagram that came without a kernel timestamp."""
        if self._fastio is not None:
            rows, overflow = self._fastio.recv_batch(self.sock.fileno(), self.buf, self.lengths,
                                                     self.ts, self.truncated, now_ns)
            if overflow >= 0:
                self._overflow_drops = overflow
            if rows:
                self.datagrams += rows
                self.bytes += int(self.lengths[:rows].sum())
            return rows
        recv = self.sock.recvmsg_into
        flags = socket.MSG_TRUNC | socket.MSG_DONTWAIT
        rows = 0
        limit = len(self._views)
        while rows < limit:
            try:
                size, ancillary, msg_flags, _ = recv([self._views[rows]], _ANCILLARY, flags)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            ts = now_ns
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                    seconds, nanos = _TIMESPEC.unpack_from(data)
                    ts = seconds * 1_000_000_000 + nanos
                elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                    self._overflow_drops = _U32.unpack_from(data)[0]
            # A slot's bytes past `size` are left from an earlier datagram: the decoder never
            # reads past a row's length.
            self.lengths[rows] = size
            self.ts[rows] = ts
            self.truncated[rows] = bool(msg_flags & socket.MSG_TRUNC)
            self.bytes += size
            rows += 1
        self.datagrams += rows
        return rows
