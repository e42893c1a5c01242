"""`collector serve`: checks, workers, health and metrics, signals.

Start-up checks everything before binding anything: sessions JSON, data directory, that no
one listens on our ports (probed without SO_REUSEPORT, so that a second collector cannot
silently join our group and take half the traffic). Problems raise `StartupError` (the CLI
prints one line and exits 2). Then N worker processes each bind their own SO_REUSEPORT
sockets, meter, and report; the supervisor serves /healthz and /metrics from their reports,
restarts a worker that dies, reloads sessions on SIGHUP, and on SIGTERM/SIGINT stops the
workers (which drain, export every flow and write) within `shutdown_timeout`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import threading
import time
import uuid

from collector.serve import activation, logs
from collector.serve.config import Address, ServeConfig
from collector.serve.http import HealthServer
from collector.serve.receiver import open_listener, port_free
from collector.serve.worker import Listener, Snapshot, Worker
from collector.decode import GENEVE_PORT, VXLAN_PORT
from collector.sessions import SessionRegistry, SessionsError
from collector.store.rows import sessions_batch
from collector.store.writer import DatasetWriter, remove_stale_temporaries

log = logging.getLogger("collector.serve")
_CONTEXT = multiprocessing.get_context("spawn")  # no fork of a threaded process


class StartupError(RuntimeError):
    """The appliance cannot start; the message is one line for the operator."""


def _worker_main(index: int, config: ServeConfig, conn, registry: SessionRegistry | None,
                 sockets: list[tuple[str, int, socket.socket]]) -> None:
    """Entry point of a worker process. `sockets`: (listener, port, socket) that the
    supervisor opened for this worker and keeps open across its restarts."""
    # Born with SIGHUP blocked (see Supervisor._spawn): ignore it, then let signals in.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    logs.setup(config.log_format)
    listeners = [Listener(name, port, sock) for name, port, sock in sockets]
    # The supervisor's map is the one in force: not the files, which may have changed since.
    _stop_with_parent()
    worker: Worker | None = None

    def report(snapshot: Snapshot) -> None:
        try:
            conn.send(snapshot)
        except (BrokenPipeError, OSError):
            # The supervisor is gone (killed): nobody serves health any more. Stop as on
            # SIGTERM, writing every flow held; systemd restarts the service.
            if worker is not None:
                worker.stop = True

    def inbox() -> SessionRegistry | None:
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            # The supervisor is gone: its end of the pipe reads as EOF. Stop and write (this
            # used to raise out of the worker, losing every flow it held).
            if worker is not None:
                worker.stop = True
            return None

    worker = Worker(index, config, listeners, registry, report, inbox)
    raise SystemExit(worker.run())


def _stop_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by SIGKILL): the worker then drains,
    exports and writes what it holds instead of receiving with nobody to report to."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the next report's broken pipe stops the worker instead
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.registry: SessionRegistry | None = None
        self.snapshots: dict[int, Snapshot] = {}
        self.retired: list[Snapshot] = []  # last reports of workers that were replaced
        self.processes: dict[int, multiprocessing.Process] = {}
        self.pipes: dict[int, multiprocessing.connection.Connection] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.reload_requested = False
        self.reload_errors = 0
        self._writable: tuple[float, str | None] = (0.0, None)
        self.http: HealthServer | None = None
        self._pipe_lock = threading.Lock()  # the HTTP thread (flush) and the main loop send
        # Each worker's sockets, opened once by the supervisor: a worker that dies (SIGKILL,
        # a crash) takes only its copies with it, so what the kernel queued for it meanwhile
        # waits for its replacement instead of being lost with a closed socket.
        self.sockets: dict[int, list[tuple[str, int, socket.socket]]] = {}
        self._flush_seq = 0
        self.uploader = None  # with --data s3://...: the spool's Uploader (objectstore.py)
        # UDP sockets systemd passed (deploy/collector.socket): worker 0 reads them
        self.inherited: list[socket.socket] = []

    # -- start-up --------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that can be known wrong before binding: StartupError if anything is."""
        config = self.config
        if config.sessions:
            try:
                self.registry = SessionRegistry.load(config.sessions)
            except SessionsError as err:
                raise StartupError(str(err)) from None
        try:
            config.data.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StartupError(f"data directory {config.data}: {err.strerror or err}") from None
        problem = self._write_probe()
        if problem:
            raise StartupError(f"data directory {config.data} is not writable: {problem}")
        udp = [("--listen", config.listen)]
        if config.geneve_listen is not None:
            udp.append(("--geneve-listen", config.geneve_listen))
        try:
            self.inherited = self.inherited or activation.inherited_datagram_sockets()
        except activation.ActivationError as err:
            raise StartupError(str(err)) from None
        for option, address in udp:
            if not any(activation.same_address(s, address) for s in self.inherited):
                self._probe(option, address, socket.SOCK_DGRAM)
        self._probe("--health", config.health, socket.SOCK_STREAM)
        self._warn_rcvbuf()

    def _probe(self, option: str, address: Address, kind: int) -> None:
        try:
            port_free(address, kind)
        except OSError as err:
            proto = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
            what = "is in use (another collector?)" if err.errno == 98 else f"cannot be bound: {err.strerror}"
            raise StartupError(f"{option} {proto} {address} {what}") from None

    def _warn_rcvbuf(self) -> None:
        sock = socket.socket(self.config.listen.family, socket.SOCK_DGRAM)
        try:
            from collector.serve.receiver import SO_RCVBUFFORCE

            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.config.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.rcvbuf)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        finally:
            sock.close()
        if granted < self.config.rcvbuf:
            log.warning("socket receive buffer capped at %d bytes (asked %d): raise it with "
                        "`sysctl -w net.core.rmem_max=%d` or run with CAP_NET_ADMIN",
                        granted, self.config.rcvbuf, self.config.rcvbuf)

    def _remove_stale_temporaries(self, writer_id: str | None = None) -> None:
        """Temporaries that our writers (a worker's, or all of them at start) left when they
        were killed mid-write: invisible to readers, but their space is reclaimed here."""
        removed = remove_stale_temporaries(self.config.data, self.config.collector_id, writer_id)
        if removed:
            log.warning("removed %d temporary file(s) left by a killed writer in %s",
                        len(removed), self.config.data)

    def _write_probe(self) -> str | None:
        """None when a file can be created in the data directory, else why not. A data
        directory deleted while running is made again, as the writers' next flush would."""
        probe = self.config.data / f".probe-{self.config.collector_id}-{uuid.uuid4().hex}"
        try:
            self.config.data.mkdir(parents=True, exist_ok=True)
            with open(probe, "xb") as f:
                f.write(b"ok")  # on a full disk the create works and the write fails
            return None
        except OSError as err:
            return f"{type(err).__name__}: {err.strerror or err}"
        finally:
            try:
                probe.unlink()  # never leave a probe behind, least of all on a full disk
            except OSError:
                pass

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        self.check()
        # Our ports were free: no writer of ours runs (`--check` alone never gets here).
        self._remove_stale_temporaries()
        try:
            self.http = HealthServer(self.config.health, self.health, self.metrics_source,
                                     self.flush if self.config.control else None)
        except OSError as err:
            raise StartupError(f"--health TCP {self.config.health}: {err.strerror or err}") from None
        self._start_uploader()
        self._store_sessions()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        try:
            for index in range(self.config.workers):
                self.sockets[index] = self._open_sockets(inherited=index == 0)
        except activation.ActivationError as err:
            raise StartupError(str(err)) from None
        except OSError as err:
            raise StartupError(f"--listen {self.config.listen}: {err.strerror or err}") from None
        for sock in self.inherited:  # systemd passed a socket no listener of ours has
            log.warning("socket activation: ignoring the socket on %s (no listener has it)",
                        sock.getsockname())
        for index in range(self.config.workers):
            self._spawn(index)
        self.http.start()
        log.info("collector serving: VXLAN on UDP %s, GENEVE on UDP %s, health and metrics on "
                 "http://%s/healthz, %d worker(s), data in %s, %d session(s)",
                 self.config.listen, self.config.geneve_listen or "off", self.config.health,
                 self.config.workers, self.config.data,
                 len(self.registry) if self.registry else 0)
        try:
            while not self.stopping:
                self._read_reports(timeout=0.5)
                if self.reload_requested:
                    self._reload()
                self._restart_dead()
        finally:
            # Whatever went wrong here, the workers are stopped and write what they hold.
            code = self._shutdown()
        return code

    def _open_sockets(self, inherited: bool = False) -> list[tuple[str, int, socket.socket]]:
        """One worker's sockets; `inherited`: the sockets systemd passed where it passed one
        (socket activation: what arrived while no service ran is queued in them)."""
        config = self.config

        def listener(option: str, address: Address) -> socket.socket:
            if inherited:
                sock = activation.take(self.inherited, address, config.rcvbuf, option,
                                       config.workers)
                if sock is not None:
                    log.info("socket activation: %s %s from systemd", option, address)
                    return sock
            return open_listener(address, config.rcvbuf)[0]

        sockets = [("vxlan", VXLAN_PORT, listener("--listen", config.listen))]
        if config.geneve_listen is not None:
            sockets.append(("geneve", GENEVE_PORT, listener("--geneve-listen", config.geneve_listen)))
        return sockets

    def _spawn(self, index: int) -> None:
        parent, child = _CONTEXT.Pipe(duplex=True)
        # The sockets go to the child as file descriptors (spawn passes them at exec).
        process = _CONTEXT.Process(target=_worker_main,
                                   args=(index, self.config, child, self.registry,
                                         self.sockets[index]),
                                   name=f"collector-worker-{index}", daemon=False)
        # A SIGHUP to the whole process group (`kill -HUP -PGID`, `pkill -HUP collector`)
        # would kill a worker still importing, before it ignores SIGHUP (its default action
        # terminates): the child inherits a blocked SIGHUP across exec. Ours stays pending and
        # is handled when unblocked here.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        child.close()
        self.processes[index], self.pipes[index] = process, parent
        self.started_at[index] = time.time()

    def _read_reports(self, timeout: float) -> None:
        ready = multiprocessing.connection.wait(list(self.pipes.values()), timeout)
        for conn in ready:
            try:
                snapshot = conn.recv()
            except (EOFError, OSError):
                continue
            previous = self.snapshots.get(snapshot.worker)
            if previous is not None and previous.pid != snapshot.pid:
                # A restarted worker counts from zero: keep its predecessor's counts so that
                # the totals (Prometheus counters) never go backwards. Not its kernel drops:
                # those are the socket's own counter, which the successor reads on.
                previous.kernel_drops = {}
                self.retired.append(previous)
            self.snapshots[snapshot.worker] = snapshot

    def _restart_dead(self) -> None:
        for index, process in list(self.processes.items()):
            if not process.is_alive() and not self.stopping:
                log.error("worker %d (pid %s) exited with %s: restarting it", index,
                          process.pid, process.exitcode)
                self.pipes[index].close()
                self._remove_stale_temporaries(f"w{index}")
                self._spawn(index)

    def _shutdown(self) -> int:
        log.info("stopping: draining sockets, exporting every flow, writing files")
        for process in self.processes.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for sockets in self.sockets.values():
            for _, _, sock in sockets:
                sock.close()  # the workers' copies stay open until they have drained them
        deadline = time.monotonic() + self.config.shutdown_timeout
        while any(p.is_alive() for p in self.processes.values()) and time.monotonic() < deadline:
            self._read_reports(timeout=0.1)
        code = 0
        for index, process in self.processes.items():
            if process.is_alive():
                log.error("worker %d did not stop within %.0f s: killed", index,
                          self.config.shutdown_timeout)
                process.kill()
                code = 1
            process.join(1)
            if process.exitcode not in (0, None, -signal.SIGKILL):
                log.error("worker %d exited with %s", index, process.exitcode)
                code = 1
        self._read_reports(timeout=0)
        if self.uploader is not None:  # the workers' last files, within its own timeout
            self.uploader.stop(self.config.shutdown_timeout)
        if self.http is not None:
            self.http.stop()
        totals = self.totals()
        log.info("stopped: %d datagrams received, %d decoded, %d malformed, %d flows written",
                 totals["received"], totals["decoded"], totals["malformed"], totals["flows"])
        return code

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _on_reload(self, signum, frame) -> None:
        self.reload_requested = True

    def _reload(self) -> None:
        self.reload_requested = False
        if not self.config.sessions:
            log.info("SIGHUP: no --sessions files to reload")
            return
        try:
            registry = SessionRegistry.load(self.config.sessions)
        except SessionsError as err:
            self.reload_errors += 1
            log.error("SIGHUP: sessions reload failed, keeping the old map: %s", err)
            return
        if self.registry is not None and list(registry) == list(self.registry):
            # A storm of SIGHUPs (or a reload with nothing new) writes no sessions file
            log.info("SIGHUP: %d sessions loaded, unchanged", len(registry))
            return
        self.registry = registry
        self._store_sessions()
        self._send_all(registry)  # one map, loaded once, for every worker
        log.info("SIGHUP: %d sessions loaded", len(registry))

    def _send_all(self, message) -> None:
        with self._pipe_lock:
            for index, pipe in self.pipes.items():
                try:
                    pipe.send(message)
                except OSError as err:
                    log.error("could not reach worker %d: %s", index, err)

    def flush(self, timeout: float = 10.0) -> tuple[bool, dict]:
        """Every worker exports its active flows (end_reason 'flush') and writes its files;
        returns when all have (True) or at `timeout` (False). Runs in the HTTP thread."""
        with self._pipe_lock:
            self._flush_seq += 1
            seq = self._flush_seq
        self._send_all(("flush", seq))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [s for s in self.snapshots.values() if s.flushed >= seq]
            if len(done) >= self.config.workers:
                return True, {"flushed": seq, "workers": len(done)}
            time.sleep(0.02)
        return False, {"flushed": seq, "error": f"not every worker flushed within {timeout} s"}

    def _start_uploader(self) -> None:
        """With an object store: upload the spool (`config.data`) to it, from a thread."""
        if self.config.store is None:
            return
        from collector.store.objectstore import StoreURLError, Uploader, aws_settings

        try:
            settings = aws_settings()
        except StoreURLError as err:
            raise StartupError(str(err)) from None
        config = self.config
        self.uploader = Uploader(config.data, config.store, max_files=config.spool_max_files,
                                 max_bytes=config.spool_max_bytes,
                                 unhealthy_after=config.store_unhealthy_after)
        log.info("object store %s (endpoint %s, region %s, credentials from %s); spool %s",
                 config.store, settings.endpoint or "AWS", settings.region or "SDK default",
                 settings.credentials_source, config.data)
        problem = self.uploader.probe()
        if problem:
            log.warning("object store: %s; files wait in the spool %s", problem, config.data)
        self.uploader.start()

    def _store_sessions(self) -> None:
        if not self.registry:
            return
        writer = DatasetWriter(self.config.data, "sessions", collector_id=self.config.collector_id,
                               writer_id="supervisor")
        try:
            writer.write(sessions_batch(self.registry, self.config.collector_id, time.time_ns()))
            writer.close()
        except OSError as err:
            log.error("could not store the sessions in %s: %s", self.config.data, err)

    # -- health and metrics ----------------------------------------------------------------

    def health(self) -> tuple[bool, dict]:
        now = time.time()
        monotonic = time.monotonic()  # system-wide: comparable with the workers' reports
        reasons = []
        workers = []
        for index in range(self.config.workers):
            snapshot = self.snapshots.get(index)
            process = self.processes.get(index)
            alive = process is not None and process.is_alive()
            age = None if snapshot is None else monotonic - snapshot.loop_monotonic
            workers.append({"worker": index, "alive": alive,
                            "loop_age_seconds": None if age is None else round(age, 3)})
            if not alive:
                reasons.append(f"worker {index} is not running")
            elif snapshot is None or snapshot.pid != process.pid:
                if now - self.started_at.get(index, now) > self.config.health_stale:
                    reasons.append(f"worker {index} has not reported")
                else:
                    reasons.append(f"worker {index} is starting")
            elif age > self.config.health_stale:
                reasons.append(f"worker {index} receive loop last ran {age:.1f} s ago")
            elif snapshot.flush_error:
                reasons.append(f"disk: worker {index} last flush failed: {snapshot.flush_error}; "
                               f"{snapshot.rows_pending} rows wait in memory")
        writable = self._writable_cached(monotonic)
        if writable:
            reasons.append(f"disk: data directory {self.config.data} is not writable: {writable}")
        try:
            free = shutil.disk_usage(self.config.data).free
        except OSError:
            free = 0
        if free < self.config.min_free:
            reasons.append(f"disk: free space {free} bytes below --min-free {self.config.min_free}")
        if self.uploader is not None:
            reasons.extend(self.uploader.health_reasons())
        if self.stopping:
            reasons.append("shutting down")
        ok = not reasons
        return ok, {"status": "ok" if ok else "unhealthy", "reasons": reasons,
                    "workers": workers, "free_bytes": free, "collector_id": self.config.collector_id}

    def _writable_cached(self, now: float) -> str | None:
        checked_at, problem = self._writable
        if now - checked_at >= 1.0:
            problem = self._write_probe()
            self._writable = (now, problem)
        return problem

    def metrics_source(self):
        snapshots = list(self.snapshots.values())
        names = {s.vni: s.session_id for s in self.registry} if self.registry else {}
        alive = sum(1 for i, s in self.snapshots.items()
                    if self.processes.get(i) is not None and self.processes[i].is_alive()
                    and self.processes[i].pid == s.pid
                    and time.monotonic() - s.loop_monotonic <= self.config.health_stale)
        extra = {"sessions": names, "proc_drops": self._proc_drops(),
                 "healthy": self.health()[0], "retired": list(self.retired),
                 "workers_up": alive, "reload_errors": self.reload_errors}
        if self.uploader is not None:
            extra["store"] = self.uploader.metrics()
        return snapshots, extra

    def _proc_drops(self) -> dict[int, int]:
        """Kernel drops of our UDP ports, from /proc/net/udp and udp6 (last column)."""
        ports = {self.config.listen.port}
        if self.config.geneve_listen is not None:
            ports.add(self.config.geneve_listen.port)
        drops = dict.fromkeys(ports, 0)
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        port = int(fields[1].rsplit(":", 1)[1], 16)
                        if port in drops:
                            drops[port] += int(fields[-1])
            except (OSError, ValueError, IndexError, StopIteration):
                continue
        return drops

    def totals(self) -> dict:
        snapshots = self.snapshots.values()
        return {
            "received": sum(sum(s.datagrams.values()) for s in snapshots),
            "decoded": sum(s.decoded for s in snapshots),
            "malformed": sum(sum(s.malformed.values()) for s in snapshots),
            "flows": sum(sum(s.flows_exported.values()) for s in snapshots),
        }


def serve(config: ServeConfig) -> int:
    """Run the appliance until SIGTERM/SIGINT; returns the exit code."""
    logs.setup(config.log_format)
    return Supervisor(config).run()
