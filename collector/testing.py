"""End-to-end tests against a real `collector serve`: a library and a pytest plugin.

An installed collector provides the pytest fixtures (entry point ``pytest11``, name
``collector``; disable with ``-p no:collector``)::

    def test_my_capture(collector_server):
        collector_server.replay("fixtures/seed-session.pcap", as_captured=True)
        rows = collector_server.query("SELECT protocol, sum(packets + rev_packets) FROM flows GROUP BY 1")
        assert dict(rows) == {6: 10, 17: 4, 1: 4}

- ``collector_server``: a started `CollectorServer` (one worker), stopped after the test; the
  test fails if it does not stop cleanly (exit 0).
- ``collector_server_factory``: ``collector_server_factory(workers=2, sessions=["s.json"],
  idle_timeout=5)`` starts one with other settings (any `collector serve` option, as a
  keyword); every server it made is stopped after the test.

The library part imports neither pytest nor anything heavy at import time, so scripts use
it too (`collector.demo` does)::

    with CollectorServer() as server:            # a temporary directory, removed at the end
        server.replay("capture.pcap", vni=7159709, packet_length=25)
        print(server.query("SELECT count(*) FROM flows"))

`CollectorServer` runs ``python -m collector serve --control`` as a subprocess of the current
interpreter, on free loopback ports (VXLAN, GENEVE, health), with its data directory under
its work directory, ``--flush-seconds 1``, ``--min-free 1M``, and a fixed collector id
(``test``); the environment's ``COLLECTOR_*`` variables are not passed on, so a test does not
depend on the shell it runs from. Loopback only.

**Queries see everything sent.** `query` calls `flush` first (``flush=False`` to skip):
it waits until the workers have received every datagram this object sent (`replay`,
`send`), then ``POST /flush`` makes every worker export its active flows (``end_reason``
``'flush'``) and write its files. A conversation that goes on after a flush continues in a
new row, so count with ``sum(...)`` rather than rows. Each query opens a new connection, so
it sees the files written since the last. A datagram the kernel dropped (a receive buffer
overflow: ``collector_kernel_drops_total``) makes `flush` raise rather than let a test
compare short counts: pace such replays (``pps=...``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["CollectorServer", "CollectorServerError", "Metrics", "free_port"]

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0  # workers are spawned processes that import numpy and pyarrow
STOP_TIMEOUT = 15.0  # serve's own bound is --shutdown-timeout (10 s)
FLUSH_TIMEOUT = 15.0
_PACES = ("multiplier", "pps", "mbps", "topspeed")
_MIRROR_LISTENERS = {4789: "vxlan", 4790: "vxlan", 6081: "geneve"}


class CollectorServerError(RuntimeError):
    """The server did not start, answer, receive or stop as it should; the message says what
    and ends with the tail of its log."""


def free_port(kind: int = socket.SOCK_DGRAM, host: str = LOOPBACK) -> int:
    """A port the kernel just gave for `host` (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- metrics ------------------------------------------------------------------------------------


class Metrics(Mapping):
    """Parsed Prometheus text. A mapping from ``name{label="value",...}`` (labels sorted; just
    ``name`` without labels) to the sample's value, plus:

    - ``value(name, **labels)``: the sum of the samples of `name` whose labels match (0.0
      when none): ``metrics.value("collector_datagrams_received_total", listener="vxlan")``;
    - ``by_label(name, label)``: {label value: summed value};
    - ``text``: the exposition as served.
    """

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), float(sample.value)))
        self._by_key = {_sample_key(name, labels): value for name, labels, value in self.samples}

    def __getitem__(self, key: str) -> float:
        return self._by_key[key]

    def __iter__(self):
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, name: str, **labels) -> list[tuple[dict[str, str], float]]:
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(want) for k, want in labels.items())]

    def value(self, name: str, **labels) -> float:
        return sum(v for _, v in self.find(name, **labels))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.find(name):
            out[labels.get(label)] = out.get(labels.get(label), 0.0) + value
        return out

    def __repr__(self) -> str:
        return f"Metrics({len(self)} samples)"


def _sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


# -- the server ---------------------------------------------------------------------------------


class CollectorServer:
    """`collector serve --control` as a subprocess on free loopback ports.

    `workdir`: where the data directory (``data/``) and the server's log (``serve.stderr``)
    go; default: a new temporary directory, removed by `cleanup` (and by leaving a ``with``
    block). `workers`: receive processes (1: every datagram meets one flow table, so rows are
    deterministic). `sessions`: AWS CLI JSON files naming the VNIs. `args`: more command-line
    arguments, as given; any other keyword is a `collector serve` option
    (``idle_timeout=5`` -> ``--idle-timeout 5``; True/False -> ``--x``/``--no-x``).

    After `start`: ``vxlan``, ``geneve``, ``health`` are (host, port) addresses, ``data_dir``
    the dataset, ``sent`` the datagrams this object has sent.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *, workers: int = 1,
                 sessions: Iterable[str | os.PathLike] = (), host: str = LOOPBACK,
                 flush_seconds: float = 1.0, collector_id: str = "test",
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT, **options) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="collector-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.host = host
        self.workers = workers
        self.sessions = tuple(Path(p) for p in sessions)
        self.flush_seconds = flush_seconds
        self.collector_id = collector_id
        self.args = tuple(str(a) for a in args) + _option_args(options)
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.stderr_path = self.workdir / "serve.stderr"
        self.popen_options: dict = {}  # more subprocess.Popen arguments (pass_fds, ...)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.vxlan: tuple[str, int] | None = None
        self.geneve: tuple[str, int] | None = None
        self.health: tuple[str, int] | None = None
        self.sent = 0

    # -- lifecycle

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "collector", "serve", "--control",
                "--workers", str(self.workers), "--flush-seconds", f"{self.flush_seconds:g}",
                "--data", str(self.data_dir), "--collector-id", self.collector_id,
                "--listen", _address_text(*self.vxlan),
                "--geneve-listen", _address_text(*self.geneve),
                "--health", _address_text(*self.health),
                "--min-free", "1M"]
        for path in self.sessions:
            argv += ["--sessions", str(path)]
        return argv + list(self.args)

    def start(self) -> CollectorServer:
        """Start the server and wait until ``/healthz`` answers 200. A port taken meanwhile
        by someone else is retried on new ports; any other failure to start raises."""
        if self.running():
            return self
        for attempt in range(3):
            self._pick_ports()
            env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
            env.update(self.env)
            with open(self.stderr_path, "wb") as err:
                self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                                stdout=err, stderr=subprocess.STDOUT, env=env,
                                                cwd=self.workdir, start_new_session=True,
                                                **self.popen_options)
            self.returncode = None
            try:
                self.wait_healthy(self.start_timeout)
                return self
            except CollectorServerError:
                code = self.process.poll()
                if code == 2 and "in use" in self.log() and attempt < 2:
                    continue  # a free port was taken between picking and binding it
                self.kill()
                raise
        raise AssertionError("unreachable")

    def _pick_ports(self) -> None:
        vxlan = free_port(socket.SOCK_DGRAM, self.host)
        geneve = free_port(socket.SOCK_DGRAM, self.host)
        while geneve == vxlan:
            geneve = free_port(socket.SOCK_DGRAM, self.host)
        self.vxlan, self.geneve = (self.host, vxlan), (self.host, geneve)
        self.health = (self.host, free_port(socket.SOCK_STREAM, self.host))

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> dict:
        """Poll ``/healthz`` until it answers 200; returns its JSON body."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if not self.running():
                code = None if self.process is None else self.process.returncode
                raise CollectorServerError(f"collector serve exited with {code} before it "
                                           f"was healthy\n{self.log_tail()}")
            try:
                status, body = self._request("GET", "/healthz", timeout=2.0)
                last = (status, body.decode(errors="replace").strip())
                if status == 200:
                    return json.loads(body)
            except OSError as err:
                last = err
            if time.monotonic() > deadline:
                raise CollectorServerError(f"/healthz not 200 within {timeout:g} s (last: "
                                           f"{last})\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit, which must be 0 (every flow written): else
        `CollectorServerError` with the log's tail. Stopping a stopped server returns its
        exit code again."""
        if self.process is None:
            return 0
        if self.returncode is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
                    raise CollectorServerError(f"collector serve did not exit within "
                                               f"{timeout:g} s of SIGTERM\n{self.log_tail()}")
            self.returncode = self.process.returncode
            if self.returncode != 0:
                raise CollectorServerError(f"collector serve exited with {self.returncode}"
                                           f"\n{self.log_tail()}")
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the process group started (the supervisor and its workers)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        """Remove the work directory if this object made it (a temporary one)."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> CollectorServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.stop()
            else:
                self.kill()  # the test failed already: do not hide its error behind ours
        finally:
            self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exit {self.returncode}"
        return f"<CollectorServer vxlan={self.vxlan} geneve={self.geneve} {state}>"

    # -- logs

    def log(self) -> str:
        """The server's stdout and stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "--- collector serve log (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    # -- HTTP

    def url(self, path: str) -> str:
        return f"http://{_address_text(*self.health)}{path}"

    def _request(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url(path), method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def metrics(self) -> Metrics:
        """``GET /metrics``, parsed."""
        status, body = self._request("GET", "/metrics", timeout=5.0)
        if status != 200:
            raise CollectorServerError(f"/metrics answered {status}\n{self.log_tail()}")
        return Metrics(body.decode())

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> Metrics:
        """Make every worker export its active flows (``end_reason`` 'flush') and write its
        files, once it has received every datagram sent through this object (`wait_received`);
        returns the metrics as of the flush."""
        self.wait_received(self.sent, timeout)
        status, body = self._request("POST", "/flush", timeout=max(1.0, timeout))
        if status != 200:
            raise CollectorServerError(f"POST /flush answered {status}: "
                                       f"{body.decode(errors='replace').strip()}\n"
                                       f"{self.log_tail()}")
        return self.metrics()  # a worker reports its counters as it completes a flush

    def wait_received(self, total: int, timeout: float = FLUSH_TIMEOUT) -> Metrics:
        """Wait until the workers report `total` datagrams received (they report once a
        second, and at each flush). Raises when the kernel dropped some (a receive buffer
        overflow) or at `timeout`."""
        self._require_running("wait for datagrams")
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            received = metrics.value("collector_datagrams_received_total")
            if received >= total:
                return metrics
            # Both count the receive buffer's overflows, seen from the socket (SO_RXQ_OVFL)
            # and from /proc/net/udp: a datagram dropped will never be received.
            dropped = max(metrics.value("collector_kernel_drops_total"),
                          metrics.value("collector_socket_drops"))
            if dropped:
                raise CollectorServerError(
                    f"{total} datagrams sent, {received:.0f} received: the kernel dropped "
                    f"{dropped:.0f} (collector_kernel_drops_total, collector_socket_drops); "
                    "pace the replay (pps=...) or raise net.core.rmem_max")
            if time.monotonic() > deadline:
                raise CollectorServerError(f"{total} datagrams sent, only {received:.0f} "
                                           f"received after {timeout:g} s\n{self.log_tail()}")
            time.sleep(0.05)

    def _require_running(self, what: str) -> None:
        if not self.running():
            code = None if self.process is None else self.process.poll()
            raise CollectorServerError(f"cannot {what}: the server is not running (exit "
                                       f"{code})\n{self.log_tail()}")

    # -- data

    def query(self, sql: str, parameters=None, *, flush: bool = True) -> list[tuple]:
        """The rows of `sql` over the dataset (views `flows`, `packets`, `sessions`,
        `conversations`, `vpc_flow_logs`), as a list of tuples. Flushes first while the
        server runs, unless ``flush=False``."""
        if flush and self.running():
            self.flush()
        from collector.query import connect

        con = connect(self.data_dir)
        try:
            result = con.execute(sql, parameters)
            if result.description is None:  # a statement without a result
                return []
            # Through Arrow: timestamps become datetimes in UTC without needing pytz.
            table = result.to_arrow_table()
            return list(zip(*(_values(column) for column in table.columns)))
        finally:
            con.close()

    # -- sending

    def address(self, listener: str) -> tuple[str, int]:
        """The (host, port) of the ``"vxlan"`` or ``"geneve"`` listener."""
        if listener not in ("vxlan", "geneve"):
            raise ValueError(f"listener {listener!r}: expected 'vxlan' or 'geneve'")
        address = self.vxlan if listener == "vxlan" else self.geneve
        if address is None:
            raise CollectorServerError("the server has not been started")
        return address

    def replay(self, capture: str | os.PathLike | Iterable[str | os.PathLike],
               vni: int | None = None, packet_length: int | None = None, encap: str = "vxlan",
               *, as_captured: bool = False, listener: str | None = None, **options):
        """Replay one capture (or several) to the listener its datagrams belong on, as AWS
        sends them, and return the `collector.replay.ReplaySummary`.

        `vni`: the session's VNI; `packet_length`: its PacketLength (None: whole packets);
        `encap`: "vxlan" (to the VXLAN listener) or "geneve" (GWLB, to the GENEVE listener).
        ``as_captured=True`` re-sends the mirror datagrams of an appliance capture unchanged
        (their own VNIs; to the listener of their UDP port); its other records need `vni`.
        Other `collector.replay.ReplayOptions` as keywords (``pps=20000``, ``limit=10``);
        the pace is ``topspeed`` unless one is given (``topspeed=False``: the capture's
        own timing). Raises when a datagram failed.
        """
        from collector.replay import ReplayOptions, replay

        paths = ([capture] if isinstance(capture, (str, os.PathLike)) else list(capture))
        if not any(name in options for name in _PACES):
            options["topspeed"] = True
        settings = ReplayOptions(vni=vni, packet_length=packet_length, encap=encap,
                                 as_captured=as_captured, **options)
        if listener is None:
            listener = _listener_for(paths, settings)
        self._require_running("replay")
        summary = replay(paths, _address_text(*self.address(listener)), settings)
        self.sent += summary.packets
        if summary.failed:
            raise CollectorServerError(f"replay: {summary.failed} datagrams failed\n"
                                       f"{summary.format()}\n{self.log_tail()}")
        return summary

    def send(self, payloads: Iterable[bytes], listener: str = "vxlan") -> int:
        """Send UDP payloads (e.g. `collector.build.vxlan(...)`) to a listener, each from a
        new socket (so from its own source port); returns how many."""
        self._require_running("send")
        host, port = self.address(listener)
        count = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for payload in payloads:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, (host, port))
            count += 1
        self.sent += count
        return count


def _values(column) -> list:
    """A result column as Python values; whole decimals (DuckDB's sum of integers is a
    HUGEINT, a 38-digit decimal in Arrow) as ints, as DuckDB's own fetchall gives them."""
    import pyarrow as pa

    if pa.types.is_decimal(column.type) and column.type.scale == 0:
        return [None if v is None else int(v) for v in column.to_pylist()]
    return column.to_pylist()


def _option_args(options: Mapping) -> tuple[str, ...]:
    """`collector serve` flags for keyword settings: idle_timeout=5 -> --idle-timeout 5."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return tuple(args)


def _listener_for(paths: Sequence, settings) -> str:
    """The listener a replay goes to: the encapsulation's, or with `as_captured` the one of
    the captured datagrams' UDP port (records that are no mirror datagram are encapsulated
    with `encap` when a VNI is given). One replay goes to one listener."""
    if not settings.as_captured:
        return settings.encap
    from collector.capture import read_capture
    from collector.decode.outer import outer_datagram

    listeners: set[str] = set()
    for path in paths:
        for record in read_capture(path):
            outer = outer_datagram(record.linktype, record.data)
            if outer is not None:
                listeners.add(_MIRROR_LISTENERS.get(outer.port, "vxlan"))
            elif settings.vni is not None:
                listeners.add(settings.encap)
    if len(listeners) > 1:
        raise ValueError(f"{', '.join(map(str, paths))}: datagrams for both listeners "
                         f"({', '.join(sorted(listeners))}): replay them separately, or give "
                         "listener=")
    return listeners.pop() if listeners else settings.encap


# -- the pytest plugin --------------------------------------------------------------------------


def pytest_configure(config) -> None:
    """Register the fixtures (pytest is imported only here, when pytest loads the plugin)."""
    if not config.pluginmanager.has_plugin("collector-fixtures"):
        config.pluginmanager.register(_fixtures(), "collector-fixtures")


def _fixtures():
    import pytest

    class CollectorFixtures:
        @pytest.fixture
        def collector_server_factory(self, tmp_path):
            """Start `CollectorServer`s with settings: ``factory(workers=2, sessions=[...],
            idle_timeout=5)``; each is stopped after the test, which fails unless it exits
            0."""
            servers: list[CollectorServer] = []

            def factory(**settings) -> CollectorServer:
                settings.setdefault("workdir", tmp_path / f"collector-{len(servers)}")
                server = CollectorServer(**settings).start()  # one that fails to start raises
                servers.append(server)
                return server

            yield factory
            errors = []
            for server in servers:
                try:
                    server.stop()
                except CollectorServerError as err:
                    errors.append(str(err))
                finally:
                    server.kill()
            if errors:
                pytest.fail("\n".join(errors), pytrace=False)

        @pytest.fixture
        def collector_server(self, collector_server_factory):
            """A started `CollectorServer` (one worker, --control, temporary data) for one
            test; stopped after it."""
            return collector_server_factory()

    return CollectorFixtures()
