"""UDP sockets to the replay target: the only part of `collector.replay` that does I/O.

AWS sends each inner flow's copies from its own outer UDP source port (`encap`), and a
receiver may depend on it: the kernel spreads datagrams over SO_REUSEPORT workers, and an NLB
over appliances, by the outer source port. To reproduce it, `Sender` keeps a pool of sockets,
each bound to one source port, created when a port is first needed. The pool is bounded
(`pool_size`, 4096 by default; the soft RLIMIT_NOFILE is raised toward the hard limit to make
room); when it is full the least recently used socket is closed. A port that cannot be bound
(another socket holds it, or it is privileged) is remembered, and its datagrams go from one
shared socket with an ephemeral port; `SendStats` counts both, so the summary can say so.

Every datagram is either sent or counted failed:

- ``ENOBUFS`` / ``EAGAIN`` (the kernel is short of buffers): retried after 50 µs, doubling, at
  most 8 times (about 13 ms); then failed.
- Sockets are **connected** to the target, so the kernel reports what the target's host
  answers: when nothing listens on the target port it answers ICMP port unreachable, and the
  *next* send on that socket fails with ``ECONNREFUSED``. That datagram was not sent and is
  counted failed; the refused datagram before it had left (it counts as sent) and is counted
  in `refused`, as is an error still pending on a socket when it is closed. So a target
  with nothing listening shows up as failures and refusals, never as silence. (Unconnected
  sockets would report nothing at all: every datagram would count as sent.)
- Any other error (unreachable network or host, a datagram too large, a firewall's EPERM):
  failed, counted by its errno name.

`send_batch` sends many datagrams in one call: with the compiled `collector._fastio`, one
sendmmsg(2) per run of datagrams from the same socket, each datagram a shared header and a
slice of one buffer (nothing is copied); without it, `send` per datagram. Given the
datagrams' conversations (the replay's batch path), a chunk's datagrams are first grouped by
socket as far as each socket's and each conversation's order allows: one sendmmsg carries
many datagrams. Both send the same bytes from the same ports, each port's in the same order,
and count them the same way, with two differences. The batch path touches a batch's ports
in the order of their last datagram before sending it, so with more flows than `pool_size`
it may close fewer pool sockets (`evicted`). And the kernel reports an ICMP port
unreachable to the sendmmsg call *after* the one that drew it: to a target with nothing
listening, fewer datagrams fail (more leave and are refused), but the refusal is still
counted (`refused`) and said.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from collector import compiled

try:
    import resource
except ImportError:  # not on Unix: keep the process's limit as it is
    resource = None

__all__ = ["DEFAULT_POOL_SIZE", "SendStats", "Sender", "Target", "resolve_target"]

DEFAULT_POOL_SIZE = 4096
SPARE_FILES = 128  # descriptors left for everything else when the pool is sized
RETRIES = 8
FIRST_BACKOFF = 50e-6  # seconds; doubled on each retry
_RETRIED = frozenset((errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK))


class Target(NamedTuple):
    """Where the datagrams go: `host` as given, and the address it resolved to."""

    host: str
    port: int
    family: int
    address: tuple

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"target {text!r}: write an IPv6 address in brackets, [::1]:4789")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"target {text!r}: expected HOST:PORT, the port 1-65535")
    return host, int(port)


def resolve_target(text: str) -> Target:
    """Parse and resolve `HOST:PORT` (the first address the resolver gives)."""
    host, port = parse_target(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ValueError(f"target {text!r}: cannot resolve {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    return Target(host, port, family, address)


@dataclass
class SendStats:
    """What happened to the datagrams handed to `Sender.send`."""

    sent: int = 0  # accepted by the kernel
    failed: int = 0  # not sent, whatever the reason (see `errors`)
    retried: int = 0  # datagrams that needed at least one retry (ENOBUFS / EAGAIN)
    refused: int = 0  # ICMP port unreachable reports from the target (ECONNREFUSED)
    errors: Counter = field(default_factory=Counter)  # failures by errno name
    ports_bound: int = 0  # source-port sockets opened (again after an eviction)
    unbindable: set = field(default_factory=set)  # source ports that could not be bound
    shared: int = 0  # datagrams sent or tried from the shared socket instead of their port
    evicted: int = 0  # pool sockets closed to make room


class Sender:
    """Sends datagrams to `target`, each from the source port it asks for.

    `pool_size` bounds the sockets bound to source ports (0: send everything from one socket
    with an ephemeral port). `sleep` is the backoff's sleep (a test passes its own).
    """

    def __init__(self, target: Target, *, pool_size: int = DEFAULT_POOL_SIZE,
                 retries: int = RETRIES, backoff: float = FIRST_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.target = target
        self.stats = SendStats()
        self.pool_size = min(pool_size, _room_for(pool_size)) if pool_size else 0
        self._pool: OrderedDict[int, socket.socket] = OrderedDict()
        self._shared: socket.socket | None = None
        # For the batch path: each pooled port's socket fd (-1: not pooled), and the LRU order
        # as stamps set a whole batch at a time; the OrderedDict's order is brought up to
        # date from them only when it matters (an eviction, or a send from the other path).
        self._fd_of = np.full(1 << 16, -1, np.int64)
        self._stamp = np.zeros(1 << 16, np.int64)
        self._tick = 0
        self._stamps_valid = False  # every pooled port's stamp reflects its LRU place
        self._order_stale = False  # the OrderedDict's order lags the stamps
        self._retries, self._backoff, self._sleep = retries, backoff, sleep
        self._any = "::" if target.family == socket.AF_INET6 else "0.0.0.0"

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, payload: bytes, source_port: int) -> bool:
        """Send one datagram from `source_port` (or the shared socket); True when the kernel
        took it, False when it is counted failed."""
        if self._order_stale:
            self._reorder()
        self._stamps_valid = False
        sock = self._pool.get(source_port)
        if sock is None:
            sock = self._socket(source_port)
        else:
            self._pool.move_to_end(source_port)
        try:
            sock.send(payload)
        except OSError as e:
            return self._retry(sock, payload, e)
        self.stats.sent += 1
        return True

    def send_batch(self, data, offsets: np.ndarray, lengths: np.ndarray, ports: np.ndarray,
                   header: bytes = b"", *, fastio: bool | None = None,
                   conversations: np.ndarray | None = None) -> np.ndarray:
        """Send datagram i = `header` + data[offsets[i] : offsets[i] + lengths[i]] from source
        port ports[i], in order (int64 arrays; `data` any buffer). Returns the indices of the
        datagrams counted failed (usually none). `fastio` False forces the per-datagram path.

        `conversations` (int64 ids, one per datagram: the same for both directions of a flow),
        when given, lets the compiled path group each chunk's datagrams by socket
        (`collector._fastio.group_by_fd`), so that one sendmmsg call carries many of a
        socket's datagrams, not one call per change of socket: every source port's and
        every conversation's datagrams keep their order; datagrams of different
        conversations and ports may leave in another order (as they may arrive in one)."""
        if conversations is not None:
            conversations = np.ascontiguousarray(conversations, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        ports = np.ascontiguousarray(ports, dtype=np.int64)
        fast = compiled.extension("_fastio") if fastio is not False else None
        failed = []
        if fast is None:
            view = memoryview(data).cast("B")
            for i in range(len(ports)):
                start = int(offsets[i])
                payload = header + bytes(view[start:start + int(lengths[i])])
                if not self.send(payload, int(ports[i])):
                    failed.append(i)
            return np.array(failed, dtype=np.int64)
        # Chunks of at most pool_size datagrams: a chunk's ports then all fit in the pool at
        # once, so no socket is closed while a datagram of the chunk still needs it. One
        # chunk when the pool holds all the ports anyway (longer runs per socket to group).
        step = min(len(ports), self.pool_size) if self.pool_size else len(ports)
        if step < len(ports) and _distinct(ports) <= self.pool_size:
            step = len(ports)
        for first in range(0, len(ports), max(step, 1)):
            last = min(first + step, len(ports))
            fd_of = self._fds_for(ports[first:last])
            index = np.arange(first, last)
            if conversations is not None and last - first > 1:
                order = np.empty(last - first, np.int64)
                fast.group_by_fd(fd_of, conversations[first:last], order)
                index = first + order
                fd_of = fd_of[order]
            chunk_offsets, chunk_lengths = offsets[index], lengths[index]
            done = 0
            while done < last - first:
                sent, err = fast.send_batch(fd_of[done:], data, chunk_offsets[done:],
                                            chunk_lengths[done:], header)
                self.stats.sent += sent
                done += sent
                if done < last - first:  # datagram `done` failed: the per-datagram path decides
                    start = int(chunk_offsets[done])
                    payload = header + bytes(memoryview(data).cast("B")[
                        start:start + int(chunk_lengths[done])])
                    port = int(ports[index[done]])
                    sock = self._pool.get(port) or self._shared
                    if not self._retry(sock, payload, OSError(err, os.strerror(err))):
                        failed.append(int(index[done]))
                    done += 1
        return np.array(sorted(failed), dtype=np.int64)

    def _fds_for(self, ports: np.ndarray) -> np.ndarray:
        """The socket fd of each datagram of one chunk. The pool is updated as `send` would
        update it datagram by datagram: ports are stamped in the order of their last
        datagram, then ports not pooled yet get their socket (bound now, or the shared one,
        which counts each of its datagrams)."""
        n = len(ports)
        if not self._stamps_valid:  # after `send`: the OrderedDict's order becomes stamps
            pooled = np.fromiter(self._pool, np.int64, len(self._pool))
            self._stamp[pooled] = self._tick + np.arange(len(pooled))
            self._tick += len(pooled)
            self._stamps_valid = True
        # a port repeated in the chunk keeps its last datagram's stamp (the largest)
        np.maximum.at(self._stamp, ports, self._tick + np.arange(n))
        self._tick += n
        self._order_stale = True
        fds = self._fd_of[ports]
        missing = fds < 0
        if missing.any():
            rows = np.flatnonzero(missing)
            reverse = ports[rows][::-1]
            unique, last_from_end, counts = np.unique(reverse, return_index=True,
                                                       return_counts=True)
            fd_by_port = {}
            for k in np.argsort(-last_from_end, kind="stable"):  # earliest last use first
                port = int(unique[k])
                sock = self._socket(port)
                if sock is self._shared:
                    self.stats.shared += int(counts[k]) - 1
                fd_by_port[port] = sock.fileno()
            fds[rows] = [fd_by_port[int(p)] for p in ports[rows]]
        return fds

    def _reorder(self) -> None:
        """The OrderedDict in the stamps' order (oldest first)."""
        stamp = self._stamp
        self._pool = OrderedDict(sorted(self._pool.items(), key=lambda item: stamp[item[0]]))
        self._order_stale = False

    def _retry(self, sock: socket.socket, payload: bytes, error: OSError) -> bool:
        """The slow path: a send failed with `error`. Retry what a short wait may cure."""
        stats, delay = self.stats, self._backoff
        for attempt in range(self._retries + 1):
            code = error.errno
            if code not in _RETRIED or attempt == self._retries:
                if code == errno.ECONNREFUSED:
                    stats.refused += 1
                stats.failed += 1
                stats.errors[errno.errorcode.get(code, str(code))] += 1
                return False
            if attempt == 0:
                stats.retried += 1
            self._sleep(delay)
            delay *= 2
            try:
                sock.send(payload)
            except OSError as e:
                error = e
                continue
            stats.sent += 1
            return True
        raise AssertionError("unreachable: the last attempt returns")

    def _socket(self, port: int) -> socket.socket:
        """The socket for a port not in the pool: bound now, or the shared one."""
        pool = self._pool
        if self.pool_size and port not in self.stats.unbindable:
            sock = self._bind(port)
            if sock is not None:
                if len(pool) >= self.pool_size:
                    if self._order_stale:
                        self._reorder()
                        pool = self._pool
                    evicted, oldest = pool.popitem(last=False)
                    self._fd_of[evicted] = -1
                    self._close(oldest)
                    self.stats.evicted += 1
                pool[port] = sock
                self._fd_of[port] = sock.fileno()  # (its stamp: the batch path's, if any)
                self.stats.ports_bound += 1
                return sock
        self.stats.shared += 1
        if self._shared is None:
            self._shared = self._open(None)
        return self._shared

    def _bind(self, port: int) -> socket.socket | None:
        try:
            return self._open(port)
        except OSError:
            self.stats.unbindable.add(port)  # in use, or not ours to bind: once is enough
            return None

    def _open(self, port: int | None) -> socket.socket:
        sock = socket.socket(self.target.family, socket.SOCK_DGRAM)
        try:
            if port is not None:
                sock.bind((self._any, port))
            sock.connect(self.target.address)
        except OSError:
            sock.close()
            raise
        return sock

    def _close(self, sock: socket.socket) -> None:
        """Close a socket, counting a refusal the target reported after its last send."""
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                self.stats.refused += 1
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        """Close every socket. Refusals still pending on them are counted first."""
        while self._pool:
            port, sock = self._pool.popitem()
            self._fd_of[port] = -1
            self._close(sock)
        if self._shared is not None:
            self._close(self._shared)
            self._shared = None


def _distinct(ports: np.ndarray) -> int:
    """How many different ports (0-65535) `ports` holds."""
    seen = np.zeros(1 << 16, np.bool_)
    seen[ports] = True
    return int(np.count_nonzero(seen))


def _room_for(pool_size: int) -> int:
    """How many pool sockets the open-files limit allows, after raising the soft limit
    toward the hard one if `pool_size` needs it."""
    if resource is None:
        return pool_size
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = pool_size + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return pool_size
    return max(1, soft - SPARE_FILES)
