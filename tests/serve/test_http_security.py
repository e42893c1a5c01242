"""The health/metrics listener is exposed to whatever reaches the appliance: with raw sockets
against a real `collector serve`, it answers GET/HEAD of its own paths only, refuses any other
method or path, bounds the request head in size and in time (slowloris), bounds the
connections it serves at once, and binds only where configured."""

from __future__ import annotations

import socket
import time

import pytest

from collector.serve import http
from collector.testing import CollectorServer


class NoControlServer(CollectorServer):
    """`collector serve` as deployed: without --control."""

    @property
    def argv(self):
        return [a for a in super().argv if a != "--control"]


@pytest.fixture(scope="module")
def server():
    with CollectorServer() as running:
        yield running


@pytest.fixture(scope="module")
def production():
    with NoControlServer() as running:
        yield running


def exchange(address, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send `raw`, read until the server closes; the whole response."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(raw)
        return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def headers(response: bytes) -> dict:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def request(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/healthz?x=1"])
def test_get_and_head(server, path):
    got = exchange(server.health, request("GET", path))
    assert status(got) == 200 and headers(got)["connection"] == "close"
    body = got.split(b"\r\n\r\n", 1)[1]
    assert len(body) == int(headers(got)["content-length"]) > 0
    head = exchange(server.health, request("HEAD", path))
    assert status(head) == 200 and head.endswith(b"\r\n\r\n"), head[-40:]
    assert int(headers(head)["content-length"]) > 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                    "CONNECT", "PROPFIND", "FOO"])
@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_other_methods_on_its_paths_are_405(server, method, path):
    got = exchange(server.health, request(method, path, "Content-Length: 5\r\n") + b"hello")
    assert status(got) == 405, got[:80]
    assert headers(got)["allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/etc/passwd", "/../../etc/passwd", "/metrics/../etc",
                                  "/healthz/", "/flushx", "*", "http://evil/",
                                  "/%2e%2e/etc/passwd", "/" + "a" * 2000])
def test_other_paths_are_404(server, path):
    assert status(exchange(server.health, request("GET", path))) == 404


def test_flush_only_with_control(server, production):
    assert status(exchange(server.health, request("POST", "/flush", "Content-Length: 0\r\n"))) == 200
    got = exchange(server.health, request("GET", "/flush"))
    assert status(got) == 405 and headers(got)["allow"] == "POST"
    got = exchange(production.health, request("POST", "/flush", "Content-Length: 0\r\n"))
    assert status(got) == 404 and b"--control" in got
    assert status(exchange(production.health, request("GET", "/healthz"))) == 200


def test_request_line_too_long_is_431(server):
    got = exchange(server.health, request("GET", "/" + "a" * (2 * http.MAX_HEAD)))
    assert status(got) == 431


def test_header_flood_is_431(server):
    flood = "".join(f"X-{i}: {'v' * 50}\r\n" for i in range(1000))
    started = time.monotonic()
    got = exchange(server.health, request("GET", "/healthz", flood))
    assert status(got) == 431 and time.monotonic() - started < 3


@pytest.mark.parametrize("raw", [b"\r\n\r\n", b"GARBAGE\r\n\r\n", b"GET\r\n\r\n",
                                 b"GET /healthz\r\n\r\n", b"GET  HTTP/1.1\r\n\r\n",
                                 b"GET /healthz HTTP/9.9\r\n\r\n", b"GET /healthz FOO/1.1\r\n\r\n",
                                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                                 b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n",
                                 bytes(range(256)) + b"\r\n\r\n"])
def test_malformed_requests_get_an_error_not_a_hang(server, raw):
    started = time.monotonic()
    got = exchange(server.health, raw)
    assert time.monotonic() - started < 3
    if got:
        assert got.startswith(b"HTTP/1.1 ") and status(got) in (200, 400, 404, 405, 505), got[:80]
        if raw.count(b" ") < 2:  # HTTP/0.9 style: refused with a status line, not a bare body
            assert status(got) == 400, got[:80]
        assert b"Traceback" not in got


def test_slowloris_is_cut_off_at_the_head_deadline(server):
    """One byte every 0.5 s: each read succeeds, but the head's overall deadline ends it."""
    started = time.monotonic()
    with socket.create_connection(server.health, timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < http.HEAD_TIMEOUT + 5:
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.5)
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            if data:
                assert status(data) == 408, data[:80]
            closed = True
            break
    elapsed = time.monotonic() - started
    assert closed and http.HEAD_TIMEOUT - 0.5 <= elapsed <= http.HEAD_TIMEOUT + 2, elapsed


def test_connections_are_bounded_and_health_recovers(server):
    """MAX_CONNECTIONS idle connections hold every slot: the next is closed at once (no thread,
    no memory for it); when they go, health answers again immediately."""
    idle = [socket.create_connection(server.health, timeout=5) for _ in range(http.MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # let the server accept them all
        with socket.create_connection(server.health, timeout=5) as extra:
            extra.sendall(request("GET", "/healthz"))
            started = time.monotonic()
            assert read_all(extra) == b"" and time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert status(exchange(server.health, request("GET", "/healthz"))) == 200


def test_an_idle_connection_is_closed_after_the_head_deadline(server):
    started = time.monotonic()
    with socket.create_connection(server.health, timeout=15) as sock:
        assert read_all(sock) == b""
    assert time.monotonic() - started <= http.HEAD_TIMEOUT + 2


def test_binds_only_where_configured(server):
    """Health on 127.0.0.1 only: the same port on another loopback address (all of 127/8 and
    ::1 reach this host) is refused."""
    host, port = server.health
    assert host == "127.0.0.1"
    for other, family in (("127.0.0.2", socket.AF_INET), ("::1", socket.AF_INET6)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            with pytest.raises(OSError):
                sock.connect((other, port))
        finally:
            sock.close()


def test_server_header_names_no_versions(server):
    assert headers(exchange(server.health, request("GET", "/healthz")))["server"] == "collector"


@pytest.fixture(scope="module")
def in_process():
    """The same listener in this process (no workers behind it): fast enough for a property."""
    from collector.serve.config import Address

    server = http.HealthServer(Address("127.0.0.1", 0), lambda: (True, {"ok": True}),
                               lambda: ([], {}), None)
    server.start()
    yield ("127.0.0.1", server.port)
    server.stop()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60)
@given(method=st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "get", ""]), st.text(max_size=10)),
       path=st.one_of(st.sampled_from(["/healthz", "/metrics", "/flush", "/"]), st.text(max_size=40)),
       tail=st.binary(max_size=300))
def test_any_request_gets_a_status_line_or_a_close(in_process, method, path, tail):
    raw = f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "replace") + tail + b"\r\n\r\n"
    started = time.monotonic()
    got = exchange(in_process, raw, timeout=5)
    assert time.monotonic() - started < 3
    if got:
        assert got.startswith(b"HTTP/1.1 "), got[:60]
        code = status(got)
        assert code in (200, 400, 404, 405, 408, 431, 505), got[:60]
        if code == 200:
            assert method in ("GET", "HEAD") and path.split("?")[0] in ("/healthz", "/metrics", "/"), (method, path)
