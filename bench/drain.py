"""Drain benchmark: the receiver's own ceiling, without a sender competing for the CPUs.

    python bench/drain.py [--count N] [--runs R] [--workers 1,2]

The socket queue of a paused receiver is filled first (SO_RCVBUFFORCE 1 GiB per socket, N
datagrams of bench/live.py's VXLAN mix: 10,000 flows, realistic sizes, 5% cut copies, from
1,024 source ports so that SO_REUSEPORT spreads them over the workers), then the receiver is
let go and timed until every one of its sockets is empty (/proc/net/udp, sampled every 5 ms):

- `collector serve --workers W --control --rcvbuf 1G`, warmed up (2,000 datagrams and a
  POST /flush), its worker processes paused with SIGSTOP while the queue fills, resumed with
  SIGCONT; then a POST /flush writes every flow to Parquet: "drain" is until the queue is
  empty, "to Parquet" until the flush returned. The received count (metrics) must equal N.
- beside it a C receiver (compiled here with gcc): recvmmsg, batch 64, into one buffer,
  counting, waiting on stdin while the queue fills; and for each worker count above 1, the
  same with as many receiver threads, each on its own socket of one SO_REUSEPORT group (as
  serve's workers are): the ceiling of that many receivers on this machine.

Each run also prints how the queued bytes split over the sockets, and for serve what each
worker did during the drain (seconds on a CPU, seconds runnable but waiting for one, from
/proc/PID/schedstat), the supervisor's CPU, and the CPU everything else on the machine took:
whether the workers ran in parallel, and what they waited for.

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
# Every flush interval a worker writes its files and journals its open flows (~10,000 here:
# tens of ms in Arrow's threads). With the default 10 s, the interval would come due the moment
# the workers resume from their SIGSTOP (the fill takes seconds), landing one in the ~0.5 s
# timed: with 60 s, none falls in it. The flush to Parquet is timed apart ("to Parquet").
FLUSH_SECONDS = 60
SOURCES = 1024  # outer source ports: SO_REUSEPORT's hash spreads them within a few %

DRAIN_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#define BATCH 64
#define SLOT 2048
#define MAX_RECEIVERS 16
/* argv: rcvbuf [receivers [cmsg]]. With several receivers, each is a thread with its own
 * socket in one SO_REUSEPORT group (as serve's workers are), draining only its own queue.
 * cmsg 1: the socket options serve sets (SO_TIMESTAMPNS, SO_RXQ_OVFL), so that the kernel
 * builds the same control messages per datagram as for serve. */
#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif
static int with_cmsg = 0;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
static double cpu(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
typedef struct { int fd; long long count, bytes; double t0, t1, cpu; } Receiver;
static void *drain(void *arg) {
    Receiver *r = arg;
    static __thread char buf[BATCH][SLOT];
    static __thread char control[BATCH][64];
    struct mmsghdr m[BATCH];
    struct iovec v[BATCH];
    for (int i = 0; i < BATCH; i++) {
        v[i].iov_base = buf[i]; v[i].iov_len = SLOT;
        memset(&m[i], 0, sizeof m[i]);
        m[i].msg_hdr.msg_iov = &v[i]; m[i].msg_hdr.msg_iovlen = 1;
    }
    double c0 = cpu();
    r->t0 = now();
    for (;;) {
        if (with_cmsg)
            for (int i = 0; i < BATCH; i++) {
                m[i].msg_hdr.msg_control = control[i];
                m[i].msg_hdr.msg_controllen = sizeof control[i];
            }
        int n = recvmmsg(r->fd, m, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break;
        r->count += n;
        for (int i = 0; i < n; i++) r->bytes += m[i].msg_len;
    }
    r->t1 = now();
    r->cpu = cpu() - c0;
    return NULL;
}
int main(int argc, char **argv) {
    int size = atoi(argv[1]), n = argc > 2 ? atoi(argv[2]) : 1, one = 1;
    with_cmsg = argc > 3 && atoi(argv[3]);
    if (n < 1 || n > MAX_RECEIVERS) { fprintf(stderr, "receivers: 1..%d\n", MAX_RECEIVERS); return 2; }
    static Receiver r[MAX_RECEIVERS];
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        if (with_cmsg) {
            setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
            setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
        }
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
        socklen_t len = sizeof a;
        getsockname(fd, (struct sockaddr *)&a, &len);  /* the others join this port */
        r[i].fd = fd;
    }
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;  /* go */
    pthread_t t[MAX_RECEIVERS];
    double t0 = now();
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, drain, &r[i]);
    long long count = 0, bytes = 0;
    double end = t0;
    for (int i = 0; i < n; i++) {
        pthread_join(t[i], NULL);
        count += r[i].count; bytes += r[i].bytes;
        if (r[i].t1 > end) end = r[i].t1;
    }
    printf("count %lld bytes %lld seconds %.6f\n", count, bytes, end - t0);
    for (int i = 0; i < n; i++)
        printf("receiver %d count %lld seconds %.6f cpu %.6f\n", i, r[i].count,
               r[i].t1 - t0, r[i].cpu);
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


def queues(port: int) -> list[int]:
    """Bytes queued on each UDP socket bound to `port` (IPv4), from /proc/net/udp."""
    found = []
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.append(int(fields[4].split(":")[1], 16))
    return found


def split(queued: list[int]) -> str:
    """How the queued bytes spread over the sockets: '53/47%'."""
    total = sum(queued) or 1
    return "/".join(f"{100 * q / total:.0f}" for q in sorted(queued, reverse=True)) + "%"


def wait_empty(port: int, sockets: int, limit: float = 300.0) -> float:
    """The moment every one of the port's `sockets` sockets is empty (sampled every 5 ms).
    A read of /proc/net/udp that misses a socket does not count as empty."""
    deadline = time.monotonic() + limit
    while True:
        queued = queues(port)
        if len(queued) >= sockets and not any(queued):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not empty")
        time.sleep(0.005)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of every thread of `pid` so
    far, from /proc/PID/task/*/schedstat (nanoseconds)."""
    on_cpu = waiting = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
            on_cpu, waiting = on_cpu + int(fields[0]), waiting + int(fields[1])
        except (OSError, ValueError, IndexError):
            pass
    return on_cpu / 1e9, waiting / 1e9


def busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all CPUs, /proc/stat)."""
    busy, _ = live.busy_jiffies()
    return busy / os.sysconf("SC_CLK_TCK")


def c_run(binary: Path, filler: Filler, count: int, receivers: int = 1,
          cmsg: bool = False) -> tuple[float, str, str]:
    """The C receiver with `receivers` threads on as many SO_REUSEPORT sockets: (datagrams/s
    until the last socket is empty, the queues' split, each receiver's share of the time).
    `cmsg`: with serve's socket options (a timestamp and a drop count per datagram)."""
    proc = subprocess.Popen([str(binary), str(RCVBUF), str(receivers), str(int(cmsg))],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        filler.fill(port, count)
        spread = split(queues(port))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.splitlines()
    fields = lines[0].split()
    got, seconds = int(fields[1]), float(fields[5])
    if got != count:
        print(f"  C receiver: {got:,} of {count:,} (the queue did not hold them all)")
    each = []
    for line in lines[1:]:  # receiver I count N seconds S cpu C
        f = line.split()
        each.append(f"{int(f[3]):,} in {float(f[5]):.3f} s (CPU {float(f[7]):.3f} s)")
    return got / seconds, spread, "; ".join(each)


def serve_run(workers: int, filler: Filler, count: int, tmp: Path, run: int) -> tuple:
    """(drain datagrams/s, to Parquet /s, the queues' split, the CPU seconds each worker and
    the supervisor used during the drain, and the drain's seconds)."""
    server = Server(tmp / f"w{workers}-{run}", workers=workers, collector_id="bench",
                    extra=("--control", "--rcvbuf", str(RCVBUF), "--flush-seconds",
                           str(FLUSH_SECONDS)),
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
        spread = split(queues(port))
        watched = [*pids, server.pid]
        cpu0 = [cpu_seconds(pid) for pid in watched]
        machine0 = busy_seconds()
        start = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        pids = []  # running again: nothing to resume if this fails
        empty = wait_empty(port, workers)
        machine = busy_seconds() - machine0
        cpu = [tuple(b - a for a, b in zip(before, cpu_seconds(pid)))
               for pid, before in zip(watched, cpu0)]
        cpu.append((machine - sum(c[0] for c in cpu), 0.0))  # everything else on the machine
        _flush(server)
        flushed = time.monotonic()
        metrics = server.wait_received(int(received0) + count, timeout=30)
        got = int(metrics.value("collector_datagrams_received_total") - received0)
        if got != count:
            print(f"  serve --workers {workers}: received {got:,} of {count:,}")
        return got / (empty - start), got / (flushed - start), spread, cpu, empty - start
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
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(source)],
                       check=True)
    filler = Filler(live.make_datagrams())
    print(f"{args.count:,} datagrams queued (bench/live.py's mix, 10,000 flows), SO_RCVBUFFORCE "
          f"{RCVBUF >> 20} MiB; medians of {args.runs} runs")
    results = {}
    worker_counts = [int(w) for w in args.workers.split(",")]
    c_label = "C recvmmsg x64 (count only)"
    with tempfile.TemporaryDirectory(prefix="collector-drain-") as tmp:
        for cmsg in (False, True):
            for receivers in sorted({1, *worker_counts}):
                label = c_label if receivers == 1 else f"C recvmmsg x64, {receivers} receivers"
                if cmsg:  # like for like: the kernel builds serve's control messages too
                    label = label.replace(" (count only)", "") + ", serve's cmsgs"
                runs = [c_run(binary, filler, args.count, receivers, cmsg)
                        for _ in range(args.runs)]
                for rate, spread, each in runs:
                    print(f"  {label}: {rate:,.0f}/s; queues {spread}; each receiver: {each}",
                          flush=True)
                results[label] = (median([r[0] for r in runs]), None)
        for workers in worker_counts:
            runs = []
            for r in range(args.runs):
                rate, parquet, spread, cpu, seconds = serve_run(workers, filler, args.count,
                                                                Path(tmp), r)
                # Do the workers run all through the drain, in parallel, or wait for a CPU
                # (and who else has it: the supervisor, the rest of the machine)?
                shares = "; ".join(f"worker {i} on a CPU {c[0]:.2f} s, waiting for one "
                                   f"{c[1]:.2f} s" for i, c in enumerate(cpu[:-2]))
                print(f"  serve --workers {workers}: {rate:,.0f}/s in {seconds:.3f} s "
                      f"({sum(c[0] for c in cpu[:-2]) / args.count * 1e6:.2f} us of worker CPU "
                      f"per datagram); queues {spread}; {shares}; supervisor {cpu[-2][0]:.2f} s; "
                      f"everything else {cpu[-1][0]:.2f} CPU-s (~1/100 s resolution) of the "
                      f"{os.cpu_count() * seconds:.2f} the machine had", flush=True)
                runs.append((rate, parquet))
            results[f"collector serve --workers {workers}"] = (
                median([r[0] for r in runs]), median([r[1] for r in runs]))
    ceiling = results[c_label][0]
    print(f"{'receiver':36s} {'drain dgram/s':>14s} {'to Parquet /s':>14s} {'of C':>6s}")
    for label, (rate, parquet) in results.items():
        shown = f"{parquet:14,.0f}" if parquet else f"{'-':>14s}"
        print(f"{label:36s} {rate:14,.0f} {shown} {rate / ceiling:6.0%}")
    for label, (rate, _) in results.items():
        if label.endswith("--workers 1"):
            print(f"target (issue 6): one worker >= 600,000/s and >= 43% of C: {rate:,.0f}/s, "
                  f"{rate / ceiling:.0%} ({'met' if rate >= 6e5 and rate >= 0.43 * ceiling else 'NOT met'})")
        elif label.endswith("--workers 2"):
            c2 = results.get("C recvmmsg x64, 2 receivers", (None,))[0]
            print(f"target (issue 6): two workers >= 1,000,000/s: {rate:,.0f}/s "
                  f"({'met' if rate >= 1e6 else 'NOT met'})"
                  + (f"; the C receiver with 2 receivers: {c2:,.0f}/s (workers at "
                     f"{rate / c2:.0%} of it)" if c2 else ""))
            c2m = results.get("C recvmmsg x64, 2 receivers, serve's cmsgs", (None,))[0]
            if c2m:
                print(f"  with serve's socket options (a timestamp and a drop count per "
                      f"datagram) the 2-receiver C ceiling is {c2m:,.0f}/s (workers at "
                      f"{rate / c2m:.0%} of it)")
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.profile:
        live.profile(filler.datagrams)


if __name__ == "__main__":
    main()
