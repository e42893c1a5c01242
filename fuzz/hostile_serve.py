"""Hostile datagrams into a live `collector serve`, with the books kept.

    python fuzz/hostile_serve.py [--count 1000000] [--seed 1] [--pps 20000] [--workers 1]

Starts `collector serve` on loopback ports (collector.testing.CollectorServer), sends `count`
datagrams of every kind in fuzz/hostile.py (round robin: valid, random, bit flips, byte
splats, wrong flags, cut headers, absurd lengths, nested tunnels, IP options and IPv6
extension chains, zero-length, 9000-byte jumbo) to its VXLAN and GENEVE ports, and while
they go samples, once a second, the resident memory of the supervisor and its workers and
the status of /healthz. At the end it checks what docs/robustness.md reports:

- the server never stopped, and no worker was restarted (workers_up as started, no
  traceback in its log);
- /healthz answered 200 at every sample;
- memory stayed bounded: the RSS after the first 10% of the datagrams to the end grows by
  less than `--rss-growth-mb`;
- the counters reconcile exactly: sent = decoded + malformed + kernel drops, and
  received = decoded + malformed.

Prints a JSON report; exit status 1 when a check fails. tests/serve/test_hostile_serve.py
runs a short version (20,000 datagrams) in the default test run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.testing import CollectorServer  # noqa: E402
from fuzz import hostile  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
        stack += _children(current)
    return total


class Sampler(threading.Thread):
    """Once a second: RSS of the server's process tree, /healthz status."""

    def __init__(self, server: CollectorServer, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (t, sent so far, rss, status)
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            try:
                with urllib.request.urlopen(self.server.url("/healthz"), timeout=5) as response:
                    status = response.status
            except urllib.error.HTTPError as err:
                status = err.code
            except OSError:
                status = 0
            self.samples.append((time.monotonic() - started, self.sent,
                                 tree_rss(self.server.pid), status))
            self.stopping.wait(self.interval)


def run(count: int, seed: int = 1, pps: float = 20000, workers: int = 1,
        rss_growth_mb: float = 64, workdir: str | None = None, progress=None) -> dict:
    report: dict = {"count": count, "seed": seed, "pps": pps, "workers": workers}
    # Random addresses make nearly every valid datagram a new flow: a 5 s idle timeout ends
    # them at the pace they come, so the flow table (and memory) reaches its steady size
    # early in the run, and growth after that would be a leak.
    with CollectorServer(workdir, workers=workers, idle_timeout=5, active_timeout=10) as server:
        sampler = Sampler(server)
        sampler.start()
        kinds = collections.Counter()
        sizes = collections.Counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        targets = {"vxlan": server.address("vxlan"), "geneve": server.address("geneve")}
        started = time.monotonic()
        try:
            for i, (kind, payload, listener) in enumerate(hostile.stream(seed, count)):
                sock.sendto(payload, targets[listener])
                kinds[kind] += 1
                sizes[kind] = max(sizes[kind], len(payload))
                sampler.sent = i + 1
                if pps and (i & 63) == 63:
                    ahead = (i + 1) / pps - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                if progress and (i + 1) % 100_000 == 0:
                    progress(f"{i + 1:,} sent, RSS {sampler.samples[-1][2] / 2**20:.0f} MiB" if sampler.samples else f"{i + 1:,} sent")
        finally:
            sock.close()
        report["send_seconds"] = round(time.monotonic() - started, 1)
        server.sent = count
        metrics = _settled(server, count)
        sampler.stopping.set()
        sampler.join()
        received = metrics.value("collector_datagrams_received_total")
        decoded = metrics.value("collector_datagrams_decoded_total")
        malformed = metrics.by_label("collector_datagrams_malformed_total", "reason")
        drops = metrics.value("collector_kernel_drops_total")
        report.update(
            kinds=dict(kinds), largest=dict(sizes), sent=count, received=int(received),
            decoded=int(decoded), malformed=int(sum(malformed.values())),
            malformed_by_reason={k: int(v) for k, v in sorted(malformed.items())},
            kernel_drops=int(drops), truncated=int(metrics.value("collector_truncated_copies_total")),
            workers_up=int(metrics.value("collector_workers_up")),
            flows_exported=int(metrics.value("collector_flows_exported_total")),
            metrics_bytes=len(metrics.text),
            session_labels=len(metrics.find("collector_session_packets_total")),
            rows_written=int(metrics.value("collector_rows_written_total")),
            still_running=server.running())
        samples = sampler.samples
        warm = [s for s in samples if s[1] >= count // 10] or samples
        report["rss_mib"] = {"start": round(samples[0][2] / 2**20, 1),
                             "after_10pct": round(warm[0][2] / 2**20, 1),
                             "peak": round(max(s[2] for s in samples) / 2**20, 1),
                             "end": round(samples[-1][2] / 2**20, 1)}
        report["health_samples"] = len(samples)
        report["health_not_200"] = sum(1 for s in samples if s[3] != 200)
        report["rss_every_10pct_mib"] = [round(s[2] / 2**20, 1) for s in _every_tenth(samples, count)]
        log = server.log()
        report["tracebacks_in_log"] = log.count("Traceback")
        report["worker_restarts_in_log"] = sum(1 for line in log.splitlines() if "restart" in line.lower())
    # after a clean stop (exit 0, every flow written)
    checks = {
        "never stopped": report["still_running"] and report["workers_up"] == workers,
        "no traceback, no restart": report["tracebacks_in_log"] == 0 and report["worker_restarts_in_log"] == 0,
        "health 200 at every sample": report["health_not_200"] == 0,
        # random VNIs must not grow /metrics without bound (collector/pipeline.py MAX_VNI_LABELS)
        "metrics bounded": report["session_labels"] <= workers * 1024 + 1,
        "memory bounded": (max(s[2] for s in warm) - warm[0][2]) / 2**20 < rss_growth_mb,
        "sent = decoded + malformed + kernel drops":
            report["sent"] == report["decoded"] + report["malformed"] + report["kernel_drops"],
        "received = decoded + malformed": report["received"] == report["decoded"] + report["malformed"],
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    return report


def _every_tenth(samples, count):
    picked, mark = [], 0
    for sample in samples:
        if sample[1] >= mark:
            picked.append(sample)
            mark += max(1, count // 10)
    return picked


def _settled(server: CollectorServer, count: int, timeout: float = 120.0):
    """The metrics once every datagram is accounted for (received or dropped by the kernel),
    or at `timeout` (then the reconciliation check reports the gap)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        seen = (metrics.value("collector_datagrams_received_total")
                + metrics.value("collector_kernel_drops_total"))
        if seen >= count or time.monotonic() > deadline:
            time.sleep(1.5)  # workers report once a second: let the last report land
            return server.metrics()
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pps", type=float, default=20000, help="send rate (0: as fast as possible)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rss-growth-mb", type=float, default=64)
    args = parser.parse_args()
    report = run(args.count, args.seed, args.pps, args.workers, args.rss_growth_mb,
                 progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
