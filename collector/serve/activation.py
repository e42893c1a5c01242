"""systemd socket activation: UDP sockets that outlive the service.

Without it a crash of the whole service (supervisor and workers: SIGKILL, the OOM killer)
closes every socket, and what the mirror sessions send until the restarted service has bound
new ones (RestartSec plus the start, ~3 s) is refused by the kernel. With
`deploy/collector.socket`, systemd owns one socket per listener (ListenDatagram=, with
ReusePort=yes): it queues what arrives while no service runs, up to its receive buffer, and
hands the socket to the next service (LISTEN_FDS / LISTEN_PID, sd_listen_fds(3)). Worker 0
reads that socket; the others' sockets join its SO_REUSEPORT group as usual.

Only the supervisor reads the variables, and it removes them: a worker or any program started
later must not take the descriptors for its own.
"""

from __future__ import annotations

import os
import socket

from collector.serve.config import Address
from collector.serve.receiver import SO_RCVBUFFORCE, SO_RXQ_OVFL, SO_TIMESTAMPNS

SD_LISTEN_FDS_START = 3


class ActivationError(RuntimeError):
    """Sockets passed by systemd that collector cannot use as they are."""


def inherited_datagram_sockets(env: dict | None = None) -> list[socket.socket]:
    """The UDP sockets systemd passed to this process (none when not socket-activated, or
    when the variables name another process); removes LISTEN_* from the environment."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a count of descriptors")
    found = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ActivationError(f"descriptor {fd} from systemd is not a socket: {err}") from None
        if sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            found.append(sock)
        else:
            sock.detach()  # not ours to close: a stream socket (health) is not used yet
    return found


def same_address(sock: socket.socket, address: Address) -> bool:
    host, port = sock.getsockname()[:2]
    if port != address.port or sock.family != address.family:
        return False
    return socket.inet_pton(sock.family, host) == socket.inet_pton(address.family, address.host)


def take(sockets: list[socket.socket], address: Address, rcvbuf: int, option: str,
         workers: int) -> socket.socket | None:
    """The inherited socket bound to `address` (removed from `sockets`), set up as
    `open_listener` sets up its own: receive buffer, kernel timestamps and drop counts,
    non-blocking. None when systemd passed none for it."""
    for sock in sockets:
        if same_address(sock, address):
            break
    else:
        return None
    sockets.remove(sock)
    if workers > 1 and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        raise ActivationError(
            f"{option} {address}: the socket systemd passed has no SO_REUSEPORT, so the other "
            f"workers' sockets cannot join it: set ReusePort=yes in collector.socket "
            f"(or workers = 1)")
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:  # without CAP_NET_ADMIN: up to net.core.rmem_max (or systemd's ReceiveBuffer=)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 < rcvbuf:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    sock.setblocking(False)
    return sock
