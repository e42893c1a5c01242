"""Soak: `collector serve` held at a steady rate with 100,000 concurrent flows and flow churn,
then reconciled to the datagram: nothing lost, memory flat, files as expected.

    python bench/soak.py [--minutes M] [--rate R] [--flows 100000] [--rounds 12]
                         [--workers 2] [--idle-timeout 15] [--flush-seconds 10]
    make soak                      # SOAK_MINUTES (10), SOAK_RATE (probed), SOAK_WORKERS (2)

Loopback only (127.0.0.1); bounded in time and count.

Traffic. A small C sender (gcc -O2, built into a temp dir) sends VXLAN datagrams (inner
Ethernet/IPv4/UDP, 110 bytes of payload: 160-byte datagrams) at `--rate`, paced by a token
bucket that sleeps (clock_nanosleep), from 256 sockets (a flow always from the same one, as
AWS gives each flow its own source port, so SO_REUSEPORT keeps a flow on one worker).
Datagram n goes to slot j = n mod F (F = --flows) in round r = n div F. Each slot carries a
succession of flows of --rounds packets each, its flows changing at rounds staggered by slot
(so 1/rounds of the slots change flow every round: churn, not waves); a flow's packets
alternate direction (both endpoints send). So F flows are live at any time, each getting a
packet every F/rate seconds, and F/rounds new flows start every round. The flow of datagram
n is a pure function of n: the script knows each flow's packet count without recording.

Rate. --rate, or 80% of a zero-loss rate probed first on a fresh server (5 s steps from
10,000/s up by x1.4 until one loses a datagram; the last clean step is the zero-loss rate). On
a machine shared with other jobs the probe finds what the machine sustains *now*.

During the soak, every --report-seconds (60), one line: datagrams received and the kernel
drops so far, flows active, files and rows written, and the RSS of the supervisor and each
worker (/proc/PID/status VmRSS). At the end: the server is stopped (SIGTERM: every flow is
exported and written), then reconciled:

- counters: sent = received (collector_datagrams_received_total) = decoded, kernel drops 0;
- dataset: sum(packets + rev_packets) over the flows table = sent; per flow (keyed by its
  10.x endpoint), the packets written equal the packets the schedule sent it, for every flow;
- memory: RSS growth from the second report to the last (the first minute is warm-up);
- files: count and sizes (expected: about workers x seconds / flush-seconds files, more
  at hour boundaries; max_rows bounds a file's rows).

Exit status 0 when everything reconciles and RSS grew less than --rss-growth (20%), else 1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from collector import build  # noqa: E402
from collector.testing import CollectorServer  # noqa: E402

HOST = "127.0.0.1"
PAYLOAD = 110
SOCKETS = 256
SERVER_ADDR = "192.168.0.1"
VNI = 4242

SENDER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* soak-sender TEMPLATE HOST PORT RATE SECONDS FLOWS ROUNDS SOCKETS FIRST IP SPORT DPORT CSUM
   TEMPLATE: one datagram; IP, SPORT, DPORT, CSUM: offsets of the inner IPv4 header, the UDP
   ports and the IPv4 header checksum in it. Datagram n (from FIRST) goes to flow
   F * ((r + j % K) / K) + j, j = n % F, r = n / F; odd rounds swap the endpoints.
   Prints: sent N failed F seconds S next M */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint16_t checksum(const unsigned char *p, int len) {
    uint32_t sum = 0;
    for (int i = 0; i < len; i += 2) sum += (p[i] << 8) | p[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int main(int argc, char **argv) {
    if (argc != 14) { fprintf(stderr, "usage: see the source\n"); return 2; }
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    long long flows = atoll(argv[6]), rounds = atoll(argv[7]);
    int nsock = atoi(argv[8]);
    long long n = atoll(argv[9]);
    int ip = atoi(argv[10]), sp = atoi(argv[11]), dp = atoi(argv[12]), cs = atoi(argv[13]);
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror("template"); return 1; }
    unsigned char buf[2048];
    int len = (int)fread(buf, 1, sizeof buf, f);
    fclose(f);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &dst.sin_addr);
    struct sockaddr_in src = {.sin_family = AF_INET};
    inet_pton(AF_INET, argv[2], &src.sin_addr);
    int *fds = calloc(nsock, sizeof *fds);
    for (int s = 0; s < nsock; s++) {
        fds[s] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[s] < 0 || bind(fds[s], (void *)&src, sizeof src) || connect(fds[s], (void *)&dst, sizeof dst)) {
            perror("socket"); return 1;
        }
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    unsigned char server[4];
    memcpy(server, buf + ip + 16, 4);
    long long limit = (long long)(rate * seconds + 0.5), sent = 0, failed = 0;
    double t0 = now(), end = t0 + seconds;
    while (sent + failed < limit) {
        double t = now();
        if (t >= end) break;
        if ((sent + failed) % 32 == 0) {
            double due = t0 + (sent + failed) / rate;
            if (due > t) {
                struct timespec ts;
                ts.tv_sec = (time_t)due; ts.tv_nsec = (long)((due - (double)ts.tv_sec) * 1e9);
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
        }
        long long j = n % flows, r = n / flows;
        long long id = flows * ((r + j % rounds) / rounds) + j;
        unsigned char client[4] = {10, (id >> 16) & 0xff, (id >> 8) & 0xff, id & 0xff};
        uint16_t cport = (uint16_t)(10000 + (id >> 24)), sport = (uint16_t)(5000 + id % 1000);
        int forward = (r & 1) == 0;
        memcpy(buf + ip + 12, forward ? client : server, 4);
        memcpy(buf + ip + 16, forward ? server : client, 4);
        uint16_t a = htons(forward ? cport : sport), b = htons(forward ? sport : cport);
        memcpy(buf + sp, &a, 2);
        memcpy(buf + dp, &b, 2);
        buf[cs] = buf[cs + 1] = 0;
        uint16_t c = checksum(buf + ip, 20);
        buf[cs] = c >> 8; buf[cs + 1] = c & 0xff;
        for (;;) {
            ssize_t w = send(fds[id % nsock], buf, len, 0);
            if (w >= 0) { sent++; break; }
            if (errno == EINTR) continue;
            if (errno == ENOBUFS || errno == EAGAIN) { usleep(50); continue; }
            if (errno == ECONNREFUSED) { failed++; break; }
            perror("send"); return 1;
        }
        n++;
    }
    printf("sent %lld failed %lld seconds %.6f next %lld\n", sent, failed, now() - t0, n);
    return 0;
}
"""


@dataclass
class Sent:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    next: int = 0


class Sender:
    """The C sender and its datagram template."""

    def __init__(self, tmp: Path, flows: int, rounds: int) -> None:
        self.flows, self.rounds = flows, rounds
        source = tmp / "soak-sender.c"
        source.write_text(SENDER_C)
        self.binary = tmp / "soak-sender"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(self.binary), str(source)], check=True)
        spec = build.FrameSpec(ip_version=4, proto=build.UDP, src="10.0.0.0", dst=SERVER_ADDR,
                               sport=0x1357, dport=0x2468, payload=bytes(PAYLOAD))
        datagram = build.vxlan(build.mirrored_frame(spec).data, vni=VNI)
        self.ip = datagram.index(bytes([10, 0, 0, 0, 192, 168, 0, 1])) - 12
        self.sport = datagram.index(b"\x13\x57\x24\x68")
        self.dport = self.sport + 2
        assert datagram[self.ip] == 0x45 and self.sport == self.ip + 20
        # UDP checksum 0: "none" in IPv4, valid whatever the sender patches.
        udp_checksum = self.sport + 6
        datagram = datagram[:udp_checksum] + b"\0\0" + datagram[udp_checksum + 2:]
        self.template = tmp / "template.bin"
        self.template.write_bytes(datagram)
        self.size = len(datagram)

    def run(self, port: int, rate: float, seconds: float, first: int = 0) -> Sent:
        done = subprocess.run(
            [str(self.binary), str(self.template), HOST, str(port), repr(rate), repr(seconds),
             str(self.flows), str(self.rounds), str(SOCKETS), str(first), str(self.ip),
             str(self.sport), str(self.dport), str(self.ip + 10)],
            capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the sender failed ({done.returncode}): {done.stderr.strip()}")
        found = re.search(r"sent (\d+) failed (\d+) seconds ([\d.]+) next (\d+)", done.stdout)
        return Sent(int(found[1]), int(found[2]), float(found[3]), int(found[4]))


def expected_packets(flows: int, rounds: int, first: int, count: int) -> np.ndarray:
    """Packets per flow id for datagrams first .. first+count-1 (the sender's schedule)."""
    totals = np.zeros(0, dtype=np.int64)
    step = 4_000_000
    for start in range(first, first + count, step):
        n = np.arange(start, min(start + step, first + count), dtype=np.int64)
        j, r = n % flows, n // flows
        ids = flows * ((r + j % rounds) // rounds) + j
        counts = np.bincount(ids)
        if len(counts) > len(totals):
            totals = np.pad(totals, (0, len(counts) - len(totals)))
        totals[:len(counts)] += counts
    return totals


def flow_ids(addresses, ports) -> np.ndarray:
    """The flow id back from its client endpoint 10.a.b.c:port."""
    octets = np.array([[int(x) for x in a.split(".")] for a in addresses], dtype=np.int64)
    return ((np.asarray(ports, dtype=np.int64) - 10000) << 24) | (octets[:, 1] << 16) | (
        octets[:, 2] << 8) | octets[:, 3]


# -- memory and metrics ----------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Report:
    minute: float
    received: float
    kernel_drops: float
    flows_active: float
    files: float
    rows: float
    rss: dict = field(default_factory=dict)  # pid -> MiB

    def line(self) -> str:
        memory = ", ".join(f"{pid} {mib:.0f}" for pid, mib in self.rss.items())
        return (f"  t={self.minute:5.1f} min: received {self.received:,.0f}, kernel drops "
                f"{self.kernel_drops:,.0f}, flows active {self.flows_active:,.0f}, files "
                f"{self.files:,.0f}, rows {self.rows:,.0f}; RSS MiB (supervisor, workers): {memory}")


def report(server: CollectorServer, started: float) -> Report:
    metrics = server.metrics()
    pids = [server.pid] + children(server.pid)
    return Report((time.monotonic() - started) / 60,
                  metrics.value("collector_datagrams_received_total"),
                  max(metrics.value("collector_kernel_drops_total"),
                      metrics.value("collector_socket_drops")),
                  metrics.value("collector_flows_active"),
                  metrics.value("collector_files_written_total"),
                  metrics.value("collector_rows_written_total"),
                  {pid: rss_mib(pid) for pid in pids if rss_mib(pid)})


# -- probe and soak --------------------------------------------------------------------------


def server_for(workdir: Path, args) -> CollectorServer:
    return CollectorServer(workdir, workers=args.workers, flush_seconds=args.flush_seconds,
                           collector_id="soak", idle_timeout=args.idle_timeout,
                           active_timeout=args.active_timeout, max_flows=args.max_flows,
                           start_timeout=60)


def probe(tmp: Path, sender: Sender, args) -> float:
    """The highest of 10k, 14k, 19.6k ... datagrams/s held 5 s without loss, on a fresh server."""
    server = server_for(tmp / "probe", args).start()
    clean, rate, first = 0.0, 10_000.0, 0
    try:
        while rate <= args.probe_max:
            before = server.metrics()
            sent = sender.run(server.vxlan[1], rate, args.probe_seconds, first)
            first = sent.next
            time.sleep(2.0)  # workers report once a second
            after = server.metrics()
            received = (after.value("collector_datagrams_received_total")
                        - before.value("collector_datagrams_received_total"))
            short = sent.sent < 0.97 * rate * args.probe_seconds
            lost = sent.sent - received
            print(f"  probe {rate:>9,.0f}/s x {args.probe_seconds:g} s: sent {sent.sent:,}, "
                  f"received {received:,.0f}{' (sender short)' if short else ''}"
                  f"{f', LOST {lost:,.0f}' if lost else ''}", flush=True)
            if lost or short:
                break
            clean, rate = rate, rate * 1.4
    finally:
        server.kill()
        server.cleanup()
    return clean


def soak(tmp: Path, sender: Sender, rate: float, args) -> bool:
    seconds = args.minutes * 60
    server = server_for(tmp / "soak", args).start()
    result: dict = {}
    started = time.monotonic()
    thread = threading.Thread(target=lambda: result.setdefault(
        "sent", sender.run(server.vxlan[1], rate, seconds)), daemon=True)
    thread.start()
    reports = [report(server, started)]
    print(reports[0].line(), flush=True)
    next_report = started + args.report_seconds
    while thread.is_alive():
        thread.join(max(0.0, min(1.0, next_report - time.monotonic())))
        if time.monotonic() >= next_report and thread.is_alive():
            reports.append(report(server, started))
            print(reports[-1].line(), flush=True)
            next_report += args.report_seconds
    sent: Sent = result["sent"]
    server.sent = sent.sent
    try:
        server.wait_received(sent.sent, timeout=120)
    except Exception as err:  # noqa: BLE001 - reported below with the counts
        print(f"  not everything was received: {str(err).splitlines()[0]}")
    reports.append(report(server, started))
    print(reports[-1].line(), flush=True)
    metrics = server.metrics()
    stop_started = time.monotonic()
    server.stop(timeout=120)
    stopped_in = time.monotonic() - stop_started

    print(f"\nsent {sent.sent:,} datagrams in {sent.seconds:.1f} s ({sent.sent / sent.seconds:,.0f}/s, "
          f"asked {rate:,.0f}/s), {sent.failed} refused; stopped in {stopped_in:.1f} s")
    received = metrics.value("collector_datagrams_received_total")
    decoded = metrics.value("collector_datagrams_decoded_total")
    drops = max(metrics.value("collector_kernel_drops_total"),
                metrics.value("collector_socket_drops"))
    ok = True

    def check(label: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and good
        print(f"  {'ok  ' if good else 'FAIL'} {label}: {detail}")

    check("counters", sent.sent == received == decoded and drops == 0 and sent.failed == 0,
          f"sent {sent.sent:,} = received {received:,.0f} = decoded {decoded:,.0f}, kernel drops "
          f"{drops:,.0f}")
    from collector.query import connect

    con = connect(server.data_dir)
    total, rows = con.execute("SELECT sum(packets + rev_packets), count(*) FROM flows").fetchone()
    check("flows' packets", int(total or 0) == sent.sent,
          f"sum(packets + rev_packets) {int(total or 0):,} over {rows:,} rows; sent {sent.sent:,}")
    table = con.execute(
        "SELECT CASE WHEN src_addr = ? THEN dst_addr ELSE src_addr END AS client, "
        "CASE WHEN src_addr = ? THEN dst_port ELSE src_port END AS port, "
        "sum(packets + rev_packets) AS packets FROM flows GROUP BY ALL",
        [SERVER_ADDR, SERVER_ADDR]).to_arrow_table()
    con.close()
    got = np.zeros(0, dtype=np.int64)
    if table.num_rows:
        ids = flow_ids(table["client"].to_pylist(), table["port"].to_numpy())
        got = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        np.add.at(got, ids, table["packets"].to_numpy().astype(np.int64))
    want = expected_packets(sender.flows, sender.rounds, 0, sent.sent)
    size = max(len(got), len(want))
    got, want = np.pad(got, (0, size - len(got))), np.pad(want, (0, size - len(want)))
    wrong = int(np.count_nonzero(got != want))
    check("per flow", wrong == 0,
          f"{int(np.count_nonzero(want)):,} flows sent, {int(np.count_nonzero(got)):,} written, "
          f"{wrong:,} with a different packet count")
    # Memory: the second report (one minute in: table full, imports done) to the last.
    first, last = (reports[1] if len(reports) > 2 else reports[0]), reports[-1]
    growth = []
    for pid, mib in last.rss.items():
        base = first.rss.get(pid)
        if base:
            growth.append((pid, base, mib, (mib - base) / base))
    worst = max((g[3] for g in growth), default=0.0)
    check("memory", worst < args.rss_growth,
          "; ".join(f"pid {pid} {a:.0f} -> {b:.0f} MiB ({g:+.1%})" for pid, a, b, g in growth)
          + f" (t={first.minute:.1f} -> {last.minute:.1f} min)")
    files = sorted(server.data_dir.glob("flows/date=*/hour=*/*.parquet"))
    sizes = [p.stat().st_size for p in files]
    hours = len({p.parent for p in files})
    expect = args.workers * seconds / args.flush_seconds
    temporaries = [p for p in server.data_dir.rglob(".*") if p.is_file()]
    check("files", bool(files) and not temporaries and len(files) <= 2 * expect + 4 * hours * args.workers,
          f"{len(files)} flows files in {hours} hour partition(s) (expected about {expect:.0f}: "
          f"{args.workers} workers x {seconds:.0f} s / {args.flush_seconds:g} s), "
          f"{sum(sizes) / 2**20:.1f} MiB, per file min {min(sizes, default=0) / 1024:.0f} "
          f"median {float(np.median(sizes)) / 1024 if sizes else 0:.0f} max "
          f"{max(sizes, default=0) / 1024:.0f} KiB, {sum(sizes) / max(rows, 1):.1f} bytes per "
          f"flow row; {len(temporaries)} temporaries left")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE") or 0),
                        help="datagrams/s (default: 80%% of a zero-loss rate probed first)")
    parser.add_argument("--share", type=float, default=0.8, help="of the probed rate")
    parser.add_argument("--flows", type=int, default=100_000, help="concurrent flows")
    parser.add_argument("--rounds", type=int, default=12, help="packets per flow (churn)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SOAK_WORKERS", 2)))
    parser.add_argument("--idle-timeout", type=float, default=15.0)
    parser.add_argument("--active-timeout", type=float, default=60.0)
    parser.add_argument("--max-flows", type=int, default=1_000_000)
    parser.add_argument("--flush-seconds", type=float, default=10.0)
    parser.add_argument("--report-seconds", type=float, default=60.0)
    parser.add_argument("--probe-seconds", type=float, default=5.0)
    parser.add_argument("--probe-max", type=float, default=200_000.0)
    parser.add_argument("--rss-growth", type=float, default=0.20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="collector-soak-") as name:
        tmp = Path(name)
        sender = Sender(tmp, args.flows, args.rounds)
        rate = args.rate
        if not rate:
            print("probing the zero-loss rate (a fresh server, 5 s steps):", flush=True)
            rate = args.share * probe(tmp, sender, args)
            if not rate:
                print("no clean probe step: the machine does not hold 10,000/s now")
                return 1
        print(f"soak: {args.minutes:g} min at {rate:,.0f} datagrams/s ({sender.size}-byte "
              f"datagrams), {args.flows:,} concurrent flows of {args.rounds} packets "
              f"({rate / args.rounds:,.0f} new flows/s), {args.workers} worker(s), idle timeout "
              f"{args.idle_timeout:g} s, flush every {args.flush_seconds:g} s; load "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
        ok = soak(tmp, sender, rate, args)
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
