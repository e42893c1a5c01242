"""Drain benchmark: the receiver's own ceiling, without a sender competing for the CPUs.

    python bench/drain.py [--count N] [--runs R] [--workers 1,2]

The socket queue of a paused receiver is filled first (SO_RCVBUFFORCE 1 GiB per socket, N
datagrams of bench/live.py's VXLAN mix: 10,000 flows, realistic sizes, 5% cut copies, from
256 source ports so that SO_REUSEPORT spreads them over the workers), then the receiver is
let go and timed until its queue is empty (/proc/net/udp, sampled every 5 ms):

- `collector serve --workers W --control --rcvbuf 1G`, warmed up (2,000 datagrams and a
  POST /flush), its worker processes paused with SIGSTOP while the queue fills, resumed with
  SIGCONT; then a POST /flush writes every flow to Parquet: "drain" is until the queue is
  empty, "to Parquet" until the flush returned. The received count (metrics) must equal N.
- beside it a C receiver (compiled here with gcc): recvmmsg, batch 64, into one buffer,
  counting, waiting on stdin while the queue fills.

Medians of R runs. Machine info and load first: other jobs on the machine slow every figure
alike, so compare the ratios.

--profile then runs a worker's path in this process on a pre-filled socket (bench/live.py's
profile: receive, decode, feed timed apart, then cProfile): where a miss comes from.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cache_dir, ensure_gcc, median, print_header  # noqa: E402

import live  # noqa: E402  (its datagram mix and queue reader)
from collector import compiled  # noqa: E402
from tests.serve.harness import HarnessError, Server  # noqa: E402

RCVBUF = 1 << 30
SOURCES = 256

DRAIN_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#define BATCH 64
#define SLOT 2048
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0), size = atoi(argv[1]);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;  /* go */
    static char buf[BATCH][SLOT];
    struct mmsghdr m[BATCH];
    struct iovec v[BATCH];
    for (int i = 0; i < BATCH; i++) {
        v[i].iov_base = buf[i]; v[i].iov_len = SLOT;
        memset(&m[i], 0, sizeof m[i]);
        m[i].msg_hdr.msg_iov = &v[i]; m[i].msg_hdr.msg_iovlen = 1;
    }
    long long count = 0, bytes = 0;
    double t0 = now();
    for (;;) {
        int n = recvmmsg(fd, m, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break;
        count += n;
        for (int i = 0; i < n; i++) bytes += m[i].msg_len;
    }
    printf("count %lld bytes %lld seconds %.6f\n", count, bytes, now() - t0);
    return 0;
}
"""


class Filler:
    """Fills a queue: the datagrams from SOURCES connected sockets, by sendmmsg when
    collector._fastio is built (Python sendto otherwise)."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.data = b"".join(datagrams)
        lengths = [len(d) for d in datagrams]
        import numpy as np
        self.np = np
        self.lengths = np.array(lengths, np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)
        self.datagrams = datagrams

    def fill(self, port: int, count: int) -> int:
        np = self.np
        socks = []
        for _ in range(SOURCES):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        fds = np.array([s.fileno() for s in socks], np.int64)
        fast = compiled.extension("_fastio")
        sent, n = 0, len(self.datagrams)
        try:
            while sent < count:
                take = min(n, count - sent)
                idx = (np.arange(take) + sent) % n
                which = fds[(np.arange(take) + sent) // 7 % SOURCES]
                if fast is not None:
                    done, err = fast.send_batch(which, self.data, self.offsets[idx],
                                                self.lengths[idx])
                    if err:
                        time.sleep(0.001)
                else:
                    done = 0
                    for j in range(take):
                        socks[int((sent + j) // 7 % SOURCES)].send(self.datagrams[int(idx[j])])
                        done += 1
                sent += done
        finally:
            for s in socks:
                s.close()
        return sent


def wait_empty(port: int, limit: float = 300.0) -> float:
    deadline = time.monotonic() + limit
    while live.rx_queue(port) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not empty")
        time.sleep(0.005)
    return time.monotonic()


def c_run(binary: Path, filler: Filler, count: int) -> float:
    proc = subprocess.Popen([str(binary), str(RCVBUF)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        filler.fill(port, count)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    fields = out.split()
    got, seconds = int(fields[1]), float(fields[5])
    if got != count:
        print(f"  C receiver: {got:,} of {count:,} (the queue did not hold them all)")
    return got / seconds


def serve_run(workers: int, filler: Filler, count: int, tmp: Path, run: int) -> tuple:
    server = Server(tmp / f"w{workers}-{run}", workers=workers, collector_id="bench",
                    extra=("--control", "--rcvbuf", str(RCVBUF)),
                    env={"PYTHONPATH": str(ROOT)})
    pids: list[int] = []
    try:
        server.start()
        server.wait_healthy(timeout=60)
        port = server.ports.vxlan
        filler.fill(port, 2000)
        server.wait_received(2000, timeout=30)
        _flush(server)
        received0 = server.scrape().value("collector_datagrams_received_total")
        pids = server.worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        filler.fill(port, count)
        time.sleep(0.2)
        start = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        pids = []
        empty = wait_empty(port)
        _flush(server)
        flushed = time.monotonic()
        metrics = server.wait_received(int(received0) + count, timeout=30)
        got = int(metrics.value("collector_datagrams_received_total") - received0)
        if got != count:
            print(f"  serve --workers {workers}: received {got:,} of {count:,}")
        return got / (empty - start), got / (flushed - start)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        try:
            if server.running():
                server.stop(timeout=60)
        except HarnessError as err:
            print(f"  (serve did not stop cleanly: {str(err).splitlines()[0]})")
        server.kill()


def _flush(server: Server) -> None:
    request = urllib.request.Request(server.url("/flush"), method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print_header("drain: a pre-filled socket queue emptied through the full pipeline")
    if ensure_gcc() is None:
        sys.exit("gcc is needed for the C receiver")
    cache = cache_dir("drain")
    binary = cache / "drain-c"
    source = cache / "drain.c"
    if not binary.exists() or not source.exists() or source.read_text() != DRAIN_C:
        source.write_text(DRAIN_C)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    filler = Filler(live.make_datagrams())
    print(f"{args.count:,} datagrams queued (bench/live.py's mix, 10,000 flows), SO_RCVBUFFORCE "
          f"{RCVBUF >> 20} MiB; medians of {args.runs} runs")
    results = {}
    with tempfile.TemporaryDirectory(prefix="collector-drain-") as tmp:
        c_rates = [c_run(binary, filler, args.count) for _ in range(args.runs)]
        results["C recvmmsg x64 (count only)"] = (median(c_rates), None)
        for workers in [int(w) for w in args.workers.split(",")]:
            runs = [serve_run(workers, filler, args.count, Path(tmp), r)
                    for r in range(args.runs)]
            results[f"collector serve --workers {workers}"] = (
                median([r[0] for r in runs]), median([r[1] for r in runs]))
    ceiling = results["C recvmmsg x64 (count only)"][0]
    print(f"{'receiver':36s} {'drain dgram/s':>14s} {'to Parquet /s':>14s} {'of C':>6s}")
    for label, (rate, parquet) in results.items():
        shown = f"{parquet:14,.0f}" if parquet else f"{'-':>14s}"
        print(f"{label:36s} {rate:14,.0f} {shown} {rate / ceiling:6.0%}")
    for label, (rate, _) in results.items():
        if label.endswith("--workers 1"):
            print(f"target (issue 6): one worker >= 600,000/s and >= 43% of C: {rate:,.0f}/s, "
                  f"{rate / ceiling:.0%} ({'met' if rate >= 6e5 and rate >= 0.43 * ceiling else 'NOT met'})")
        elif label.endswith("--workers 2"):
            print(f"target (issue 6): two workers >= 1,000,000/s: {rate:,.0f}/s "
                  f"({'met' if rate >= 1e6 else 'NOT met'})")
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.profile:
        live.profile(filler.datagrams)


if __name__ == "__main__":
    main()
