"""Health and metrics over HTTP, for the load balancer and for Prometheus.

`GET /healthz`: 200 or 503 with a JSON body saying why. An NLB TCP health check (a bare
connect) also works on the same port. `GET /metrics`: Prometheus text exposition.
`POST /flush` only with `--control`.

The port is reachable by whatever can reach the appliance, so the listener is read-only and
bounded (docs/robustness.md, Security): GET and HEAD of its paths only (any other method on
them is 405, any other path 404); the request head (request line and headers) at most
`MAX_HEAD` bytes, received within `HEAD_TIMEOUT` seconds in all (a client that drips one byte
at a time is cut off at the deadline, not at a per-read timeout it keeps resetting); a
request body is never read; at most `MAX_CONNECTIONS` connections served at once (more are
closed at accept); one request per connection (`Connection: close`), so an idle keep-alive
holds no thread.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MAX_HEAD = 8192  # bytes of request line + headers: a Prometheus scrape sends ~250
HEAD_TIMEOUT = 5.0  # seconds to receive the whole request head
WRITE_TIMEOUT = 10.0  # seconds for a client to take the response
MAX_CONNECTIONS = 32  # served at once; health checks and scrapes need a handful
HEALTH_PATHS = ("/healthz", "/health", "/")
METRICS_PATH = "/metrics"
FLUSH_PATH = "/flush"


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them: past that, a new
    connection is closed at once (the client sees a reset, the health check a failure)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, family: int, max_connections: int) -> None:
        self.address_family = family  # per instance: the class attribute is shared
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class HealthServer:
    """Serves `health()` -> (ok, body dict) and `snapshots()` -> list of worker Snapshots."""

    def __init__(self, address, health, metrics_source, flush=None, *,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Metrics(metrics_source))
        handler = type("Handler", (_Handler,), {"health": staticmethod(health),
                                                "registry": registry,
                                                "flush": staticmethod(flush) if flush else None})
        self.server = _BoundedServer((address.host, address.port), handler, address.family,
                                     max_connections)
        self.thread = threading.Thread(target=self.server.serve_forever, name="health",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    health = None
    registry = None
    flush = None  # POST /flush, only with --control
    protocol_version = "HTTP/1.1"
    timeout = WRITE_TIMEOUT  # the socket timeout; the head has its own overall deadline

    def version_string(self) -> str:  # the Server header: no Python version for scanners
        return "collector"

    def handle(self) -> None:
        """One request, then close."""
        self.close_connection = True
        head = self._read_head()
        if head is None:
            return
        # reading the head left the timeout at what remained of its deadline: writing the
        # response (a /metrics page to a slow scraper) gets its own
        self.connection.settimeout(WRITE_TIMEOUT)
        # The stdlib parses the head (request line, version, headers) from memory: it never
        # reads the socket, so its own limits (64 KiB lines, 100 headers) are not the bound.
        self.raw_requestline, _, rest = head.partition(b"\n")
        self.raw_requestline += b"\n"
        real_rfile, self.rfile = self.rfile, io.BytesIO(rest)
        try:
            if not self.parse_request():
                return  # parse_request sent the 400/505 itself
        finally:
            self.rfile = real_rfile
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            # "GET /path" without a version: the stdlib would answer with a bare body, no
            # status line; nothing that checks health or scrapes metrics speaks 0.9
            self.send_error(400)
        else:
            self._dispatch()
        self.wfile.flush()

    def _read_head(self) -> bytes | None:
        """The request head, up to and including its blank line, or None after answering
        (431 too large, 408 too slow) or when the client sent nothing."""
        sock, data = self.connection, b""
        deadline = time.monotonic() + HEAD_TIMEOUT
        while True:
            # the blank line ending the head; bare LF line ends are tolerated, as the stdlib does
            ends = [at + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (at := data.find(mark)) >= 0]
            end = min(ends, default=-1)
            if 0 <= end <= MAX_HEAD:
                return data[:end]
            if len(data) > MAX_HEAD:
                self._refuse(431, "request head larger than %d bytes" % MAX_HEAD)
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                if data:
                    self._refuse(408, "request head not received within %g s" % HEAD_TIMEOUT)
                return None
            sock.settimeout(left)
            try:
                chunk = sock.recv(MAX_HEAD + 1 - len(data))
            except (TimeoutError, socket.timeout):
                continue  # the loop sees the deadline
            except OSError:
                return None
            if not chunk:
                return None  # closed: an NLB TCP health check, or a client giving up
            data += chunk

    def _refuse(self, status: int, reason: str) -> None:
        self.request_version, self.command, self.requestline = "HTTP/1.1", "", ""
        try:
            self.connection.settimeout(WRITE_TIMEOUT)
            self._send(status, "text/plain", (reason + "\n").encode())
        except OSError:
            pass

    def _dispatch(self) -> None:
        path = self.path.split("?")[0]
        method = self.command
        if path in HEALTH_PATHS or path == METRICS_PATH:
            if method not in ("GET", "HEAD"):
                self._send(405, "text/plain", b"method not allowed: GET or HEAD\n",
                           allow="GET, HEAD")
            elif path == METRICS_PATH:
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
            else:
                ok, body = self.health()
                self._send(200 if ok else 503, "application/json",
                           (json.dumps(body, indent=1) + "\n").encode())
        elif path == FLUSH_PATH and self.flush is not None:
            if method != "POST":
                self._send(405, "text/plain", b"method not allowed: POST\n", allow="POST")
            else:
                ok, body = self.flush()
                self._send(200 if ok else 504, "application/json", (json.dumps(body) + "\n").encode())
        elif path == FLUSH_PATH:
            self._send(404, "text/plain", b"not found: POST /flush needs collector serve --control\n")
        else:
            self._send(404, "text/plain", b"not found: try /healthz or /metrics\n")

    def _send(self, status: int, content_type: str, body: bytes, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None) -> None:
        """parse_request's errors (400, 505...): a status line always (even for a request line
        too garbled to have a version), and the status phrase only: no page echoing the request."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        self._send(code, "text/plain", f"{code} {phrase}\n".encode())

    def log_message(self, format, *args) -> None:  # health checks every few seconds: quiet
        pass


class _Metrics:
    """Prometheus metrics summed over the workers' latest snapshots."""

    def __init__(self, source) -> None:
        self.source = source  # () -> (snapshots, extra dict)

    def collect(self):
        live, extra = self.source()
        # Counters add the last reports of replaced workers, so they never go backwards;
        # gauges are the live workers' only.
        snapshots = live + extra.get("retired", [])

        def labelled(name, doc, key, label, kind=CounterMetricFamily):
            family = kind(name, doc, labels=[label])
            totals: dict = {}
            for s in snapshots:
                for value, count in getattr(s, key).items():
                    totals[value] = totals.get(value, 0) + count
            for value, count in sorted(totals.items(), key=lambda item: str(item[0])):
                family.add_metric([str(value)], count)
            return family

        def total(name, doc, key, kind=CounterMetricFamily):
            return kind(name, doc, value=sum(getattr(s, key) for s in snapshots))

        yield labelled("collector_datagrams_received", "UDP datagrams received", "datagrams", "listener")
        yield labelled("collector_bytes_received", "UDP payload bytes received", "bytes", "listener")
        yield total("collector_datagrams_decoded", "datagrams decoded into a packet", "decoded")
        yield labelled("collector_datagrams_malformed", "datagrams rejected, by reason",
                       "malformed", "reason")
        yield total("collector_unknown_vni", "decoded datagrams whose VNI no session has", "unknown_vni")
        yield total("collector_truncated_copies", "copies holding less than the packet", "truncated")
        yield from self._sessions(snapshots, extra.get("sessions", {}))
        yield GaugeMetricFamily("collector_flows_active", "flows being metered",
                                value=sum(s.flows_active for s in live))
        yield labelled("collector_flows_exported", "flows written, by end reason", "flows_exported", "end_reason")
        yield CounterMetricFamily("collector_flows_evicted", "flows ended early at --max-flows",
                                  value=sum(s.flows_exported.get("evicted", 0) for s in snapshots))
        yield total("collector_files_written", "Parquet files written", "files_written")
        yield total("collector_rows_written", "flow rows written", "rows_written")
        dropped = CounterMetricFamily(
            "collector_rows_dropped", "rows dropped because writing failed (disk_full, "
            "read_only, write_error) while more than --max-pending-bytes waited",
            labels=["table", "reason"])
        counts: dict = {}
        for s in snapshots:
            for key, rows in getattr(s, "rows_dropped", {}).items():
                counts[key] = counts.get(key, 0) + rows
        for (table, reason), rows in sorted(counts.items()):
            dropped.add_metric([table, reason], rows)
        yield dropped
        yield GaugeMetricFamily("collector_rows_pending", "rows waiting in memory to be written",
                                value=sum(getattr(s, "rows_pending", 0) for s in live))
        yield total("collector_clock_steps", "wall-clock steps seen by the workers (active "
                    "flows exported at each)", "clock_steps")
        yield total("collector_flows_recovered", "flows written from the journal of a killed "
                    "worker (end_reason crash)", "flows_recovered")
        yield GaugeMetricFamily(
            "collector_journal_failing", "workers whose last journal write failed (a kill "
            "would lose more than a flush interval)",
            value=sum(1 for s in live if getattr(s, "journal_error", None)))
        flush = GaugeMetricFamily("collector_flush_duration_seconds", "duration of each worker's last flush",
                                  labels=["worker"])
        for s in live:
            flush.add_metric([str(s.worker)], s.flush_seconds)
        yield flush
        yield labelled("collector_kernel_drops", "datagrams the kernel dropped on our sockets "
                       "(SO_MEMINFO, SO_RXQ_OVFL)",
                       "kernel_drops", "listener")
        proc = GaugeMetricFamily("collector_socket_drops", "drops of our UDP ports in /proc/net/udp{,6}",
                                 labels=["port"])
        for port, drops in sorted(extra.get("proc_drops", {}).items()):
            proc.add_metric([str(port)], drops)
        yield proc
        yield GaugeMetricFamily("collector_workers_up", "workers running and reporting",
                                value=extra.get("workers_up", len(live)))
        yield CounterMetricFamily("collector_session_reload_errors",
                                  "sessions reloads refused (old map kept)",
                                  value=extra.get("reload_errors", 0))
        yield GaugeMetricFamily("collector_healthy", "1 when /healthz answers 200",
                                value=1 if extra.get("healthy") else 0)
        yield from self._store(extra.get("store"))

    @staticmethod
    def _store(store: dict | None):
        """The spool and its uploads, with --data s3://... (collector/store/objectstore.py)."""
        if store is None:
            return
        yield GaugeMetricFamily("collector_spool_files", "completed files waiting to upload",
                                value=store["spool_files"])
        yield GaugeMetricFamily("collector_spool_bytes", "bytes of the files waiting to upload",
                                value=store["spool_bytes"])
        yield CounterMetricFamily("collector_files_uploaded", "files uploaded to the object store",
                                  value=store["files_uploaded"])
        yield CounterMetricFamily("collector_bytes_uploaded", "bytes uploaded to the object store",
                                  value=store["bytes_uploaded"])
        yield CounterMetricFamily("collector_upload_failures", "file uploads that failed (retried)",
                                  value=store["upload_failures"])
        yield GaugeMetricFamily("collector_store_reachable", "0 while uploads fail",
                                value=store["store_reachable"])

    @staticmethod
    def _sessions(snapshots, names: dict):
        packets = CounterMetricFamily("collector_session_packets", "packets per mirror session",
                                      labels=["vni", "session_id"])
        wire = CounterMetricFamily("collector_session_bytes", "IP wire bytes per mirror session",
                                   labels=["vni", "session_id"])
        totals: dict = {}
        for s in snapshots:
            for vni, count in s.session_packets.items():
                entry = totals.setdefault(vni, [0, 0])
                entry[0] += count
                entry[1] += s.session_bytes.get(vni, 0)
        for vni, (count, size) in sorted(totals.items()):
            # -1: no VNI (a GENEVE datagram without VXLAN); -2: VNIs no session names, past
            # the bound on labels (collector/pipeline.py MAX_VNI_LABELS)
            labels = ["" if vni == -1 else "other" if vni < 0 else str(vni), names.get(vni, "")]
            packets.add_metric(labels, count)
            wire.add_metric(labels, size)
        yield packets
        yield wire
