"""Health and metrics over HTTP, for the load balancer and for Prometheus.

`GET /healthz`: 200 or 503 with a JSON body saying why. An NLB TCP health check (a bare
connect) also works on the same port. `GET /metrics`: Prometheus text exposition.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class HealthServer:
    """Serves `health()` -> (ok, body dict) and `snapshots()` -> list of worker Snapshots."""

    def __init__(self, address, health, metrics_source, flush=None) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Metrics(metrics_source))
        handler = type("Handler", (_Handler,), {"health": staticmethod(health),
                                                "registry": registry,
                                                "flush": staticmethod(flush) if flush else None})
        ThreadingHTTPServer.address_family = address.family
        self.server = ThreadingHTTPServer((address.host, address.port), handler)
        self.server.daemon_threads = True
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

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?")[0]
        if path in ("/healthz", "/health", "/"):
            ok, body = self.health()
            self._send(200 if ok else 503, "application/json",
                       (json.dumps(body, indent=1) + "\n").encode())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        else:
            self._send(404, "text/plain", b"not found: try /healthz or /metrics\n")

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        if self.path.split("?")[0] != "/flush":
            self._send(404, "text/plain", b"not found\n")
        elif self.flush is None:
            self._send(403, "text/plain", b"POST /flush needs collector serve --control\n")
        else:
            ok, body = self.flush()
            self._send(200 if ok else 504, "application/json", (json.dumps(body) + "\n").encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
            labels = ["" if vni < 0 else str(vni), names.get(vni, "")]
            packets.add_metric(labels, count)
            wire.add_metric(labels, size)
        yield packets
        yield wire
