"""Drive `collector serve` from tests: start it as a subprocess on free loopback ports, wait
for health, scrape and parse its metrics, send it datagrams built with `collector.build`, and
stop it. Also a small traffic model (`Traffic`) that builds mirrored conversations and
garbage and knows what the appliance must count and write for them.

Kept free of pytest so that a pytest plugin (or a script) can reuse it. Loopback only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from collector import build
from collector.decode import Malformed, decode_datagram
from collector.testing import free_port

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
SEED_SESSIONS = REPO / "fixtures" / "sessions" / "seed.json"
SEED_VNI = 7159709
SEED_SESSION_ID = "tms-08a33b1214EXAMPLE"
START_TIMEOUT = 15.0  # workers are spawned processes that import numpy and pyarrow
STOP_TIMEOUT = 12.0


class HarnessError(AssertionError):
    """Something the server did not do in time; the message says what and shows its log."""


# -- ports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    vxlan: int
    geneve: int
    health: int

    @classmethod
    def pick(cls, host: str = LOOPBACK) -> Ports:
        while True:
            ports = cls(free_port(socket.SOCK_DGRAM, host), free_port(socket.SOCK_DGRAM, host),
                        free_port(socket.SOCK_STREAM, host))
            if ports.vxlan != ports.geneve:
                return ports


# -- metrics ---------------------------------------------------------------------------------


class Metrics:
    """Parsed Prometheus text: `value(sample_name, **labels)` sums the matching samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict, float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def find(self, name: str, **labels) -> list[tuple[dict, float]]:
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(val) for k, val in labels.items())]

    def value(self, name: str, **labels) -> float:
        return sum(v for _, v in self.find(name, **labels))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.find(name):
            out[labels.get(label)] += value
        return dict(out)

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)


# -- the server ------------------------------------------------------------------------------


@dataclass
class Server:
    """`collector serve` as a subprocess. Use as a context manager, or start()/stop()."""

    workdir: Path
    host: str = LOOPBACK  # or "::1"
    ports: Ports | None = None  # default: free ports on `host`
    workers: int = 2
    data: Path | None = None
    sessions: tuple = ()
    extra: tuple = ()
    env: dict | None = None
    collector_id: str = "e2e"
    process: subprocess.Popen | None = None
    returncode: int | None = None
    stop_seconds: float | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data is None:
            self.data = self.workdir / "data"
        if self.ports is None:
            self.ports = Ports.pick(self.host)
        self.stderr_path = self.workdir / "serve.stderr"
        self.stdout_path = self.workdir / "serve.stdout"

    def address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "collector", "serve",
                "--workers", str(self.workers), "--flush-seconds", "1",
                "--data", str(self.data), "--collector-id", self.collector_id,
                "--health", self.address(self.ports.health),
                "--listen", self.address(self.ports.vxlan),
                "--geneve-listen", self.address(self.ports.geneve),
                "--min-free", "1M"]
        for path in self.sessions:
            argv += ["--sessions", str(path)]
        return argv + [str(a) for a in self.extra]

    # lifecycle

    def start(self) -> Server:
        env = dict(os.environ)
        env = {k: v for k, v in env.items() if not k.startswith("COLLECTOR_")}
        env.update(self.env or {})
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, env=env,
                                            cwd=self.workdir, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `signum`, wait for the exit; returns the exit code (stop_seconds: how long)."""
        if not self.running():
            self.returncode = self.process.wait()
            return self.returncode
        started = time.monotonic()
        self.process.send_signal(signum)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"collector serve did not exit within {timeout:.0f} s of "
                               f"{signal.Signals(signum).name}\n{self.log_tail()}") from None
        self.stop_seconds = time.monotonic() - started
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group we started (the supervisor and its workers)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            self.kill()

    # logs

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_lines(self) -> list[str]:
        return self.stderr().splitlines()

    def log_tail(self, lines: int = 30) -> str:
        return "--- serve stderr (tail) ---\n" + "\n".join(self.stderr_lines()[-lines:])

    def log_mark(self) -> int:
        """The current length of stderr: pass it as `after` to wait_log."""
        return len(self.stderr())

    def wait_log(self, text: str, timeout: float = 10.0, after: int = 0, count: int = 1) -> str:
        """Wait until `text` appears `count` times in stderr past offset `after`."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.stderr()[after:]
            if log.count(text) >= count:
                return log
            if time.monotonic() > deadline or not self.running():
                raise HarnessError(f"{text!r} x{count} not logged within {timeout:.0f} s "
                                   f"(running: {self.running()})\n{self.log_tail()}")
            time.sleep(0.05)

    # HTTP

    def url(self, path: str) -> str:
        return f"http://{self.address(self.ports.health)}{path}"

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def healthz(self) -> tuple[int, dict]:
        status, body, _ = self.get("/healthz")
        return status, json.loads(body)

    def wait_health(self, status: int = 200, timeout: float = START_TIMEOUT,
                    reason: str | None = None) -> dict:
        """Poll /healthz until it answers `status` (with a reason containing `reason`)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if not self.running():
                raise HarnessError(f"collector serve exited with {self.process.returncode} "
                                   f"while waiting for health {status}\n{self.log_tail()}")
            try:
                code, body = self.healthz()
                last = (code, body)
                if code == status and (reason is None
                                       or any(reason in r for r in body.get("reasons", []))):
                    return body
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise HarnessError(f"/healthz not {status}"
                                   f"{f' with a reason containing {reason!r}' if reason else ''} "
                                   f"within {timeout:.0f} s; last answer: {last}\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> dict:
        return self.wait_health(200, timeout)

    def scrape(self) -> Metrics:
        status, body, _ = self.get("/metrics")
        if status != 200:
            raise HarnessError(f"/metrics answered {status}")
        return Metrics(body.decode())

    def wait_metrics(self, predicate, timeout: float = 10.0, what: str = "condition") -> Metrics:
        """Scrape until predicate(metrics) is true (workers report once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.scrape()
            if predicate(metrics):
                return metrics
            if time.monotonic() > deadline:
                raise HarnessError(f"metrics: {what} not reached within {timeout:.0f} s\n"
                                   f"{metrics.text}\n{self.log_tail()}")
            time.sleep(0.2)

    def wait_received(self, total: int, timeout: float = 10.0) -> Metrics:
        """Wait until the workers have reported `total` datagrams received."""
        return self.wait_metrics(lambda m: m.value("collector_datagrams_received_total") >= total,
                                 timeout, f"collector_datagrams_received_total >= {total}")

    # processes

    def worker_pids(self) -> list[int]:
        """The spawned worker processes: children of the supervisor whose command line is
        multiprocessing's spawn entry point (the resource tracker is not one)."""
        return [pid for pid in children(self.pid) if b"spawn_main" in _cmdline(pid)]


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children, else by scanning /proc."""
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found.update(int(c) for c in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    if found:
        return sorted(found)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def spawn_serve(args, *, cwd, env=None) -> subprocess.Popen:
    """Start `collector serve ARGS` with its output captured (see `finish`); several can run
    at once, which is how start-up refusals are checked quickly."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "collector", "serve", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=full_env, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 8.0) -> subprocess.CompletedProcess:
    """Wait for a `spawn_serve` process. One still running after `timeout` is killed (its
    process group) and reported with returncode None."""
    try:
        out, err = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        code = None
    return subprocess.CompletedProcess(process.args, code, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def run_serve(args, *, cwd, env=None, timeout: float = 8.0) -> subprocess.CompletedProcess:
    """Run `collector serve ARGS` to completion (for start-up failures and --check)."""
    return finish(spawn_serve(args, cwd=cwd, env=env), timeout)


# -- the data directory ----------------------------------------------------------------------


def exchange_paths(a: Path, b: Path) -> None:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE), so that the server never sees
    the data path missing (a worker would recreate it); falls back to three renames."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    spare = a.with_name(a.name + ".exchange")
    os.rename(a, spare)
    os.rename(b, a)
    os.rename(spare, b)


# -- sending ---------------------------------------------------------------------------------


class Sender:
    """UDP sockets on loopback, each with its own source port: consecutive datagrams leave
    from different ports, so SO_REUSEPORT spreads even one conversation over the workers."""

    def __init__(self, sockets: int = 32, host: str = LOOPBACK) -> None:
        self.host = host
        self.sockets = []
        for _ in range(sockets):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.bind((host, 0))
            self.sockets.append(sock)
        self.sent = 0

    def send(self, payloads, port: int, chunk: int = 64, pause: float = 0.001) -> int:
        """Send each payload to the host's `port`, pausing every `chunk` datagrams so that the
        workers keep up (check the drop metrics anyway)."""
        count = 0
        for payload in payloads:
            self.sockets[self.sent % len(self.sockets)].sendto(payload, (self.host, port))
            self.sent += 1
            count += 1
            if count % chunk == 0:
                time.sleep(pause)
        return count

    def send_traffic(self, traffic: Traffic, ports: Ports, chunk: int = 64,
                     pause: float = 0.001) -> int:
        """Send every datagram of `traffic` in order, each to its listener's port."""
        for count, item in enumerate(traffic.datagrams, 1):
            port = ports.vxlan if item.listener == "vxlan" else ports.geneve
            self.sockets[self.sent % len(self.sockets)].sendto(item.payload, (self.host, port))
            self.sent += 1
            if count % chunk == 0:
                time.sleep(pause)
        return len(traffic.datagrams)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- traffic with its expected outcome -------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    listener: str  # "vxlan" | "geneve"
    payload: bytes
    reason: str | None = None  # the malformed reason, None for a decodable copy
    vni: int | None = None
    ip_version: int | None = None
    protocol: int | None = None
    wire_bytes: int = 0
    truncated: bool = False
    # (vni, ip_version, protocol, src, sport, dst, dport), oriented from the initiator; None
    # when the copy was cut before the addresses
    conversation: tuple | None = None
    forward: bool = True  # sent by the initiator
    captured: int = 0  # mirrored frame bytes in the copy (after the tunnel headers)


@dataclass
class Expected:
    packets: int = 0
    bytes: int = 0
    rev_packets: int = 0
    rev_bytes: int = 0
    truncated: int = 0
    tcp_flags: int = 0
    rev_tcp_flags: int = 0
    last_flags: int = 0  # of the last packet (RST last: end_reason rst)


class Traffic:
    """Mirrored datagrams in sending order, and what the appliance must make of them."""

    def __init__(self) -> None:
        self.datagrams: list[Datagram] = []
        self.expected: dict[tuple, Expected] = {}

    # building

    def conversation(self, *, vni: int, ip_version: int, protocol: int, client: str,
                     server: str, cport: int = 0, sport: int = 0, exchange=(),
                     listener: str = "vxlan", cut: int | None = None) -> list[Datagram]:
        """One conversation. `exchange`: (sender "c"/"s", tcp flags, payload size) steps; for
        ICMP the flags are ignored (echo request from the client, reply from the server).
        `cut`: truncate each mirrored frame to that many bytes (AWS PacketLength)."""
        icmp = protocol in (build.ICMP, build.ICMPV6)
        request, reply = (128, 129) if ip_version == 6 else (8, 0)
        key = (vni, ip_version, protocol, client, request if icmp else cport, server,
               reply if icmp else sport) if cut is None else None
        made = []
        for who, flags, size in exchange:
            forward = who == "c"
            src, dst = (client, server) if forward else (server, client)
            spec = build.FrameSpec(
                ip_version=ip_version, proto=protocol, src=src, dst=dst,
                sport=cport if forward else sport, dport=sport if forward else cport,
                tcp_flags=flags, icmp_type=request if forward else reply,
                payload=bytes(random.Random(size).randbytes(size)))
            frame = build.mirrored_frame(spec)
            wire = frame.fields["wire_len"][0]
            data = build.truncate(frame.data, cut)
            payload = (build.vxlan(data, vni=vni) if listener == "vxlan"
                       else build.gwlb_mirror(data, vni=vni))
            item = Datagram(listener, payload, None, vni, ip_version, protocol, wire,
                            len(data) < len(frame.data), key, forward, len(data))
            made.append(item)
            if key is not None:
                exp = self.expected.setdefault(key, Expected())
                if forward:
                    exp.packets += 1
                    exp.bytes += wire
                    exp.tcp_flags |= flags if protocol == build.TCP else 0
                else:
                    exp.rev_packets += 1
                    exp.rev_bytes += wire
                    exp.rev_tcp_flags |= flags if protocol == build.TCP else 0
                exp.last_flags = flags if protocol == build.TCP else 0
        return made

    def malformed(self, payload: bytes, listener: str, reason: str) -> Datagram:
        return Datagram(listener, payload, reason)

    def garbage(self, rng: random.Random, listener: str, count: int,
                max_len: int = 160) -> list[Datagram]:
        """Random bytes that the reference decoder rejects, with its reason (random bytes
        that happen to decode are drawn again). At most `max_len` bytes: within a receive
        slot, so the appliance sees every byte the reference decoder saw."""
        port = build.VXLAN_PORT if listener == "vxlan" else build.GENEVE_PORT
        made = []
        while len(made) < count:
            data = rng.randbytes(rng.randrange(0, max_len))
            try:
                decode_datagram(data, port=port)
            except Malformed as err:
                made.append(Datagram(listener, data, err.reason.value))
        return made

    def add(self, items) -> None:
        self.datagrams.extend(items)

    def interleave(self, groups, rng: random.Random) -> None:
        """Add several sequences, interleaved at random but each kept in its own order (a
        conversation's first packet stays its first)."""
        queues = [list(g) for g in groups if g]
        while queues:
            queue = rng.choice(queues)
            self.datagrams.append(queue.pop(0))
            if not queue:
                queues.remove(queue)

    # what must come out

    def count(self, **where) -> int:
        return sum(1 for d in self.datagrams if all(getattr(d, k) == v for k, v in where.items()))

    def decoded(self) -> list[Datagram]:
        return [d for d in self.datagrams if d.reason is None]

    def by_listener(self) -> Counter:
        return Counter(d.listener for d in self.datagrams)

    def bytes_by_listener(self) -> Counter:
        out: Counter = Counter()
        for d in self.datagrams:
            out[d.listener] += len(d.payload)
        return out

    def by_reason(self) -> Counter:
        return Counter(d.reason for d in self.datagrams if d.reason is not None)

    def packets_by_vni(self) -> Counter:
        return Counter(d.vni for d in self.decoded())

    def wire_by_vni(self) -> Counter:
        out: Counter = Counter()
        for d in self.decoded():
            out[d.vni] += d.wire_bytes
        return out

    def captured_by_vni(self) -> Counter:
        out: Counter = Counter()
        for d in self.decoded():
            out[d.vni] += d.captured
        return out

    def packets_by_protocol(self) -> Counter:
        return Counter(d.protocol for d in self.decoded())

    def truncated(self) -> int:
        return sum(d.truncated for d in self.decoded())

    def cut_groups(self) -> dict[tuple, Expected]:
        """Copies without addresses, by (vni, ip_version, protocol): one NULL-address
        conversation each."""
        out: dict[tuple, Expected] = {}
        for d in self.decoded():
            if d.conversation is None:
                exp = out.setdefault((d.vni, d.ip_version, d.protocol), Expected())
                exp.packets += 1
                exp.bytes += d.wire_bytes
                exp.truncated += d.truncated
        return out


def tcp_exchange(data_packets: int, size: int = 64, rst: bool = False) -> list[tuple]:
    """Handshake, then data both ways (PSH|ACK), optionally ended by the client's RST."""
    steps = [("c", build.SYN, 0), ("s", build.SYN | build.ACK, 0), ("c", build.ACK, 0)]
    for i in range(data_packets):
        steps.append(("c" if i % 2 == 0 else "s", build.PSH | build.ACK, size + i))
    if rst:
        steps.append(("c", build.RST | build.ACK, 0))
    return steps


def request_reply(pairs: int, size: int = 32) -> list[tuple]:
    """UDP or ICMP: request from the client, reply from the server, `pairs` times."""
    steps = []
    for i in range(pairs):
        steps += [("c", 0, size + i), ("s", 0, size + 2 * i)]
    return steps


def sessions_document(*sessions: dict) -> dict:
    """An `aws ec2 describe-traffic-mirror-sessions` answer holding `sessions`."""
    return {"TrafficMirrorSessions": list(sessions)}


def session(vni: int, session_id: str, eni: str = "eni-0123456789EXAMPLE",
            number: int = 1, packet_length: int | None = None) -> dict:
    entry = {
        "TrafficMirrorSessionId": session_id,
        "TrafficMirrorTargetId": "tmt-07f75d8feeEXAMPLE",
        "TrafficMirrorFilterId": "tmf-04812ff784EXAMPLE",
        "NetworkInterfaceId": eni,
        "OwnerId": "111122223333",
        "SessionNumber": number,
        "VirtualNetworkId": vni,
        "Description": f"test session {vni}",
        "Tags": [],
    }
    if packet_length is not None:
        entry["PacketLength"] = packet_length
    return entry


SEED_SESSION = session(SEED_VNI, SEED_SESSION_ID, "eni-070203f901EXAMPLE", 1, 25)


def write_json_atomically(path: Path, document) -> None:
    """Write a whole file under a temporary name and rename it into place (a reload never
    reads half a file)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document) if not isinstance(document, str) else document)
    os.replace(temporary, path)
