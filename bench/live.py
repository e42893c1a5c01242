"""Live receive benchmark: the highest rate `collector serve` takes with zero loss, beside C.

    python bench/live.py [--hold S] [--confirm S] [--workers 1,2] [--start R] [--c-start R]
                         [--bisect N] [--sockets N] [--profile] [--no-c]

Loopback only (127.0.0.1); every load is bounded in count and in time.

Writes (fixed seed) 16,384 VXLAN datagrams built with `collector.build` to a file: 10,000
flows (80/20 IPv4/IPv6, 70% TCP data segments, 25% UDP, 5% ICMP echo, both directions, four
VNIs), IP sizes 40% 40-100 B, 30% 552-600 B, 30% 1400-1500 B, 5% of copies cut to 25 bytes
of inner frame as PacketLength 25 cuts them. Compiles (gcc -O2, into a temp dir) two small C
programs:

- the sender: `sendmmsg` in batches of 32, rotating over --sockets (256) sockets bound to
  127.0.0.1 (one source port each, so that SO_REUSEPORT spreads the load over the workers as
  AWS's per-flow source ports do), paced by a token bucket that sleeps (clock_nanosleep,
  timer slack 1 ns, no busy-wait: it leaves the CPU to the receiver) until the next batch is
  due, for a given rate and duration; it prints what it sent. Several run at once when one
  cannot reach the rate (the one-sender ceiling is measured first).
- the reference receiver: `recvmmsg`, batch 64, SO_RCVBUFFORCE 64 MiB, counting datagrams
  until idle for 1 s; it prints the count and the socket's drops (SO_MEMINFO).

For each receiver (the C one, then `collector serve --workers N` for each N), a rate search:
from --start (20k/s; --c-start for C) up by x1.5 until a step loses a datagram, then --bisect
steps between the last clean rate and the first failed one, each step held --hold seconds;
then a confirmation at the rate found held --confirm seconds (30: the issue's hold), stepping
down 10% (at most 4 tries) while it loses anything; then one step at 1.2x that rate for the
drops. A search step fails when it loses a datagram, when the senders fall more than 3% short
of the rate asked (the sender must not be the limit, and on two cores a saturated receiver
can starve it), or when the fullest receive queue still held more than a quarter of its
buffer when the senders stopped: a receiver a few percent too slow loses nothing in 10 s,
because 64 MiB (128 MiB of kernel accounting) hold about a second of this traffic. The
confirmation counts loss only. Each step also reports the queue's peak (sampled every 0.2
s from /proc/net/udp) and how many CPUs the whole machine had busy (/proc/stat): other jobs
on the machine show there.

Each serve step is a fresh `collector serve --control --workers N --flush-seconds 1 --data
TMP` (tests/serve/harness.py: free ports, health), warmed up with 2,000 datagrams and a POST
/flush (the first Parquet write imports pandas), then measured by deltas of
`collector_datagrams_received_total` (scraped after the senders stopped and the counter
stopped moving), `collector_kernel_drops_total` (SO_RXQ_OVFL) and `collector_socket_drops`
(/proc/net/udp). Loss = sent - received. The workers' CPU time (user and system, from
/proc) over the step gives serve's cost per datagram.

--profile: a worker's receive path in this process, on a socket pre-filled with 40,000 of
the datagrams: each stage timed without a profiler (recvmsg_into into slots, decode_batch,
counters + flow table), then one pass under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's collector (and its test harness), here and in children
import collector  # noqa: E402
from collector import build  # noqa: E402
from tests.serve.harness import HarnessError, Server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ip_size  # noqa: E402

SEED = 20261125
HOST = "127.0.0.1"
DATAGRAMS, FLOWS = 16_384, 10_000
VNIS = (7159709, 7159710, 7159711, 7159712)
CUT_FRACTION, CUT = 0.05, 25
WARMUP = 2_000
SENDER_SLACK = 0.97  # a step whose senders sent less than this share of rate x hold fails
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUE_LIMIT = 2 * (64 << 20)  # per socket: SO_RCVBUFFORCE 64 MiB, which Linux doubles

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

/* sender FILE HOST PORT RATE SECONDS SOCKETS BATCH FIRST
   FILE: u32 count, then per datagram u16 length + bytes (little-endian).
   RATE 0: as fast as possible. Sends at most RATE*SECONDS datagrams, for at most SECONDS.
   Prints: sent N failed F seconds S */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 9) { fprintf(stderr, "usage: sender FILE HOST PORT RATE SECONDS SOCKETS BATCH FIRST\n"); return 2; }
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    int nsock = atoi(argv[6]), batch = atoi(argv[7]);
    long first = atol(argv[8]);
    if (batch < 1 || batch > 1024 || nsock < 1) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror("open"); return 1; }
    fseek(f, 0, SEEK_END); long size = ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(size);
    if (fread(data, 1, size, f) != (size_t)size) { perror("read"); return 1; }
    fclose(f);
    uint32_t n; memcpy(&n, data, 4);
    struct iovec *iov = calloc(n, sizeof *iov);
    long off = 4;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t len; memcpy(&len, data + off, 2);
        iov[i].iov_base = data + off + 2; iov[i].iov_len = len; off += 2 + len;
    }
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
    struct mmsghdr *msgs = calloc(batch, sizeof *msgs);
    long long limit = rate > 0 ? (long long)(rate * seconds + 0.5) : -1;
    long long sent = 0, failed = 0;
    long idx = first % n;
    int s = 0;
    double t0 = now(), end = t0 + seconds, t = t0;
    while (limit < 0 || sent + failed < limit) {
        t = now();
        if (t >= end) break;
        long long attempted = sent + failed;
        if (rate > 0) {
            double due = t0 + attempted / rate;  /* token bucket, burst = one batch */
            if (due > end) break;
            if (due > t) {
                struct timespec ts;
                ts.tv_sec = (time_t)due; ts.tv_nsec = (long)((due - (double)ts.tv_sec) * 1e9);
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
        }
        int b = batch;
        if (limit >= 0 && limit - attempted < b) b = (int)(limit - attempted);
        for (int k = 0; k < b; k++) {
            msgs[k].msg_hdr.msg_iov = &iov[idx]; msgs[k].msg_hdr.msg_iovlen = 1;
            if (++idx == (long)n) idx = 0;
        }
        int done = 0;
        while (done < b) {
            int r = sendmmsg(fds[s], msgs + done, b - done, 0);
            if (r > 0) { done += r; sent += r; continue; }
            if (errno == EINTR) continue;
            if (errno == ENOBUFS || errno == EAGAIN) { usleep(50); continue; }
            if (errno == ECONNREFUSED) { failed++; done++; continue; }  /* nobody listened */
            perror("sendmmsg"); return 1;
        }
        if (++s == nsock) s = 0;
    }
    printf("sent %lld failed %lld seconds %.6f\n", sent, failed, now() - t0);
    return 0;
}
"""

RECEIVER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
#define BATCH 64
#define WIDTH 2048

/* receiver HOST PORT MAX_SECONDS IDLE_SECONDS
   Prints "port P" once bound, then, idle for IDLE_SECONDS after the first datagram (or at
   MAX_SECONDS): count N bytes B drops D seconds S (first to last datagram). */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: receiver HOST PORT MAX_SECONDS IDLE_SECONDS\n"); return 2; }
    double max_seconds = atof(argv[3]), idle = atof(argv[4]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1, rcvbuf = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    if (bind(fd, (void *)&addr, sizeof addr)) { perror("bind"); return 1; }
    socklen_t alen = sizeof addr;
    getsockname(fd, (void *)&addr, &alen);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    static unsigned char bufs[BATCH][WIDTH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i]; iov[i].iov_len = WIDTH;
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long count = 0, bytes = 0;
    double start = now(), first = 0, last = 0;
    for (;;) {
        int r = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        double t = now();
        if (r > 0) {
            if (!count) first = t;
            count += r; last = t;
            for (int i = 0; i < r; i++) bytes += msgs[i].msg_len;
        } else if (r < 0 && errno != EAGAIN && errno != EINTR) {
            perror("recvmmsg"); return 1;
        }
        if ((count && t - last >= idle) || t - start >= max_seconds) break;
    }
    uint32_t meminfo[SK_MEMINFO_VARS] = {0};
    socklen_t mlen = sizeof meminfo;
    getsockopt(fd, SOL_SOCKET, SO_MEMINFO, meminfo, &mlen);
    printf("count %llu bytes %llu drops %u seconds %.6f\n", count, bytes,
           meminfo[SK_MEMINFO_DROPS], last - first);
    return 0;
}
"""


# -- the datagrams ---------------------------------------------------------------------------


def make_flows(count: int, rng: random.Random) -> list[tuple]:
    """(vni, version, proto, client, server, client port, server port) per flow."""
    out = []
    for i in range(count):
        v6 = rng.random() < 0.2
        pick = rng.random()
        proto = build.TCP if pick < 0.7 else build.UDP if pick < 0.95 else (
            build.ICMPV6 if v6 else build.ICMP)
        if v6:
            client, server = f"2001:db8:1::{i + 1:x}", f"2001:db8:3::{rng.randint(1, 50):x}"
        else:
            client, server = f"10.1.{i // 250}.{i % 250 + 1}", f"10.3.0.{rng.randint(1, 50)}"
        dport = (rng.choice((443, 443, 443, 80, 22, 5432, 6379)) if proto == build.TCP
                 else rng.choice((53, 53, 123, 514, 8125)) if proto == build.UDP else 0)
        out.append((rng.choice(VNIS), 6 if v6 else 4, proto, client, server,
                    rng.randint(32768, 60999), dport))
    return out


def make_datagrams(count: int = DATAGRAMS, flows: int = FLOWS, seed: int = SEED) -> list[bytes]:
    """`count` VXLAN datagrams over `flows` flows: every flow once, the rest heavy-tailed."""
    rng = random.Random(seed)
    table = make_flows(flows, rng)
    picks = list(range(flows)) + [min(int(rng.paretovariate(1.1)) - 1, flows - 1) * 7919 % flows
                                  for _ in range(count - flows)]
    rng.shuffle(picks)
    out = []
    for n, i in enumerate(picks):
        vni, version, proto, client, server, cport, sport = table[i]
        forward = rng.random() < 0.55
        src, dst = (client, server) if forward else (server, client)
        overhead = (40 if version == 6 else 20) + (20 if proto == build.TCP else 8)
        size = max(0, ip_size(rng) - overhead)
        icmp = 128 if version == 6 else 8
        spec = build.FrameSpec(
            ip_version=version, proto=proto, src=src, dst=dst,
            sport=cport if forward else sport, dport=sport if forward else cport,
            tcp_flags=(build.PSH | build.ACK) if size else build.ACK,
            icmp_type=icmp if forward else icmp + (1 if version == 6 else -8),
            ident=n & 0xFFFF, payload=rng.randbytes(size))
        frame = build.mirrored_frame(spec).data
        if rng.random() < CUT_FRACTION:
            frame = build.truncate(frame, CUT)
        out.append(build.vxlan(frame, vni=vni))
    return out


def write_datagrams(path: Path, datagrams: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(datagrams)))
        for d in datagrams:
            f.write(struct.pack("<H", len(d)) + d)


# -- the C programs --------------------------------------------------------------------------


def compile_c(tmp: Path) -> tuple[Path, Path]:
    out = []
    for name, source in (("sender", SENDER_C), ("receiver", RECEIVER_C)):
        (tmp / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp / name), str(tmp / f"{name}.c")],
                       check=True)
        out.append(tmp / name)
    return out[0], out[1]


@dataclass
class Sent:
    asked: float  # datagrams/s
    seconds: float  # the hold
    sent: int = 0
    failed: int = 0
    elapsed: float = 0.0  # the slowest sender's
    cpu: float = 0.0  # the senders' user + system seconds
    processes: int = 1

    @property
    def ok(self) -> bool:
        return self.failed == 0 and (self.asked <= 0 or self.sent >= SENDER_SLACK * self.asked * self.seconds)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0


class Senders:
    def __init__(self, binary: Path, datagrams: Path, count: int, sockets: int, batch: int) -> None:
        self.binary, self.datagrams, self.count = binary, datagrams, count
        self.sockets, self.batch = sockets, batch
        self.one_sender_ceiling: float | None = None

    def processes_for(self, rate: float) -> int:
        if rate <= 0 or self.one_sender_ceiling is None:
            return 1
        return 1 if rate <= 0.8 * self.one_sender_ceiling else 2

    def run(self, port: int, rate: float, seconds: float, processes: int | None = None) -> Sent:
        """Send at `rate` (0: flat out) to HOST:port for `seconds`; wait for the senders."""
        k = processes or self.processes_for(rate)
        procs = []
        for i in range(k):
            procs.append(subprocess.Popen(
                [str(self.binary), str(self.datagrams), HOST, str(port), repr(rate / k),
                 repr(seconds), str(self.sockets), str(self.batch), str(i * self.count // k)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        result = Sent(rate, seconds, processes=k)
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out, err = proc.stdout.read(), proc.stderr.read()
            if proc.returncode != 0:
                sys.exit(f"sender failed ({proc.returncode}): {err.strip()}")
            found = re.search(r"sent (\d+) failed (\d+) seconds ([\d.]+)", out)
            result.sent += int(found.group(1))
            result.failed += int(found.group(2))
            result.elapsed = max(result.elapsed, float(found.group(3)))
            result.cpu += usage.ru_utime + usage.ru_stime
        return result


# -- steps -----------------------------------------------------------------------------------


@dataclass
class Step:
    rate: float
    seconds: float
    sent: Sent
    received: int
    kernel_drops: int = 0  # SO_RXQ_OVFL (serve) / SO_MEMINFO drops (C)
    socket_drops: int = 0  # /proc/net/udp (serve)
    backlog_drops: int = 0  # /proc/net/softnet_stat, all CPUs (anyone's)
    cpu_user: float = 0.0  # receiver's seconds over the step
    cpu_system: float = 0.0
    queue_peak: int = 0  # bytes in the fullest receive queue of the port (/proc/net/udp), sampled
    queue_end: int = 0  # ... when the senders stopped
    queue_limit: int = 0  # the buffer those bytes fill (twice SO_RCVBUF's 64 MiB)
    busy: float = 0.0  # CPUs busy machine-wide over the send (/proc/stat), anyone's
    search: bool = True  # a search step (the queue criterion applies) or a confirmation
    note: str = ""

    @property
    def loss(self) -> int:
        return self.sent.sent - self.received

    @property
    def behind(self) -> bool:
        """The receiver fell behind: the queue held a quarter of the buffer when the senders
        stopped. A short step hides that (the buffer holds about a second), a long one not."""
        return self.queue_limit > 0 and self.queue_end > self.queue_limit / 4

    @property
    def clean(self) -> bool:
        return self.sent.ok and self.loss == 0 and not (self.search and self.behind)

    def line(self, label: str) -> str:
        verdict = ("clean" if self.clean else
                   f"SENDER SHORT ({self.sent.sent / (self.rate * self.seconds):.1%} of asked)"
                   if not self.sent.ok else f"LOSS {self.loss:,}" if self.loss
                   else "BEHIND (no loss, queue over 1/4 of the buffer at the end)")
        cpu = ""
        if self.received and (self.cpu_user or self.cpu_system):
            cpu = (f", receiver cpu {self.cpu_user / self.received * 1e6:.2f} user + "
                   f"{self.cpu_system / self.received * 1e6:.2f} sys us/dgram")
        return (f"  {label:16s} {self.rate:>9,.0f}/s x {self.seconds:.0f} s: sent {self.sent.sent:,} "
                f"({self.sent.rate:,.0f}/s, {self.sent.processes} sender(s), "
                f"{self.sent.cpu / max(self.sent.sent, 1) * 1e6:.2f} us cpu/dgram), "
                f"received {self.received:,}, kernel drops {self.kernel_drops:,}, socket drops "
                f"{self.socket_drops:,}, backlog drops {self.backlog_drops:,}{cpu}, queue peak "
                f"{self.queue_peak / 2**20:.0f} end {self.queue_end / 2**20:.0f} MiB, machine "
                f"{self.busy:.2f} CPUs busy: {verdict}"
                + (f" [{self.note}]" if self.note else ""))


def rx_queue(port: int) -> int:
    """Bytes queued on the fullest UDP socket bound to `port` (IPv4), from /proc/net/udp."""
    fullest = 0
    try:
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    fullest = max(fullest, int(fields[4].split(":")[1], 16))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return fullest


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def send_watched(senders: Senders, port: int, rate: float, seconds: float,
                 processes: int | None) -> tuple[Sent, int, int, float]:
    """Run the senders while sampling the port's receive queue every 0.2 s: (what was
    sent, queue peak, queue when they stopped, CPUs busy machine-wide)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "sent", senders.run(port, rate, seconds, processes)))
    busy0 = busy_jiffies()
    thread.start()
    peak = last = 0
    while thread.is_alive():
        last = rx_queue(port)
        peak = max(peak, last)
        thread.join(0.2)
    busy1 = busy_jiffies()
    cpus = len(os.sched_getaffinity(0))
    busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * cpus
    if "sent" not in result:
        sys.exit("the senders failed")
    return result["sent"], peak, last, busy


def softnet_drops() -> int:
    try:
        return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


class CReceiver:
    label = "C recvmmsg x64"

    def __init__(self, binary: Path, senders: Senders) -> None:
        self.binary, self.senders = binary, senders

    def step(self, rate: float, seconds: float, processes: int | None = None,
             search: bool = True) -> Step:
        backlog = softnet_drops()
        proc = subprocess.Popen([str(self.binary), HOST, "0", repr(seconds + 20), "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            port = int(line.split()[1])
            sent, peak, end, busy = send_watched(self.senders, port, rate, seconds, processes)
            _, status, usage = os.wait4(proc.pid, 0)
            out = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        found = re.search(r"count (\d+) bytes (\d+) drops (\d+)", out)
        if not found:
            sys.exit(f"C receiver: no count ({out!r} {proc.stderr.read()!r})")
        drops = int(found.group(3))  # SO_MEMINFO: the socket's drops, as /proc/net/udp shows
        return Step(rate, seconds, sent, int(found.group(1)), kernel_drops=drops, socket_drops=drops,
                    backlog_drops=softnet_drops() - backlog, cpu_user=usage.ru_utime,
                    cpu_system=usage.ru_stime, queue_peak=peak, queue_end=end,
                    queue_limit=QUEUE_LIMIT, busy=busy)


class Serve:
    def __init__(self, workers: int, senders: Senders, tmp: Path) -> None:
        self.workers, self.senders, self.tmp = workers, senders, tmp
        self.label = f"collector serve --workers {workers}"
        self.steps = 0

    def step(self, rate: float, seconds: float, processes: int | None = None,
             search: bool = True) -> Step:
        self.steps += 1
        workdir = self.tmp / f"serve-w{self.workers}-{self.steps}"
        server = Server(workdir, workers=self.workers, collector_id="bench",
                        extra=("--control",), env={"PYTHONPATH": str(ROOT)})
        try:
            server.start()
            server.wait_healthy(timeout=40)
            # Warm up: the first flush (POST /flush) imports pandas and writes a first file.
            warm = self.senders.run(server.ports.vxlan, 20_000, WARMUP / 20_000, 1)
            server.wait_received(warm.sent, timeout=20)
            request = urllib.request.Request(server.url("/flush"), method="POST", data=b"")
            with urllib.request.urlopen(request, timeout=20) as response:
                response.read()
            before = server.scrape()
            pids = server.worker_pids()
            cpu0 = cpu_seconds(pids)
            backlog = softnet_drops()
            received0 = before.value("collector_datagrams_received_total")
            sent, peak, end, busy = send_watched(self.senders, server.ports.vxlan, rate,
                                                 seconds, processes)
            after = self._drained(server, received0 + sent.sent)
            cpu1 = cpu_seconds(pids)
            note = "" if pids and len(pids) == self.workers else f"{len(pids)} worker pids found"
            return Step(
                rate, seconds, sent,
                int(after.value("collector_datagrams_received_total") - received0),
                kernel_drops=int(after.value("collector_kernel_drops_total")
                                 - before.value("collector_kernel_drops_total")),
                socket_drops=int(after.value("collector_socket_drops")
                                 - before.value("collector_socket_drops")),
                backlog_drops=softnet_drops() - backlog,
                cpu_user=cpu1[0] - cpu0[0], cpu_system=cpu1[1] - cpu0[1], queue_peak=peak,
                queue_end=end, queue_limit=QUEUE_LIMIT, busy=busy, note=note)
        finally:
            try:
                if server.running():
                    server.stop(timeout=30)
            except HarnessError as err:
                print(f"  (serve did not stop cleanly: {str(err).splitlines()[0]})")
            server.kill()
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _drained(server: Server, expected: float, quiet: float = 3.0, limit: float = 60.0):
        """Metrics once every datagram sent is counted, or the count stood still for
        `quiet` seconds (workers report once a second)."""
        deadline = time.monotonic() + limit
        last, still_since = None, time.monotonic()
        while True:
            metrics = server.scrape()
            value = metrics.value("collector_datagrams_received_total")
            if value >= expected:
                return metrics
            if value != last:
                last, still_since = value, time.monotonic()
            elif time.monotonic() - still_since >= quiet or time.monotonic() > deadline:
                return metrics
            time.sleep(0.3)


# -- the search ------------------------------------------------------------------------------


@dataclass
class Found:
    label: str
    rate: float = 0.0  # the highest confirmed zero-loss rate
    confirmed: Step | None = None
    over: Step | None = None  # at 1.2x
    first_lossy: float | None = None  # the lowest rate that failed (loss, behind, sender short)
    limited_by: str = ""
    steps: list = field(default_factory=list)


def search(receiver, start: float, hold: float, confirm: float, bisect: int,
           factor: float = 1.5, ceiling: float = 2_000_000) -> Found:
    found = Found(receiver.label)

    def run(rate: float, seconds: float, tag: str, searching: bool = True) -> Step:
        step = receiver.step(rate, seconds, search=searching)
        found.steps.append(step)
        print(step.line(tag), flush=True)
        return step

    lo, hi, rate = 0.0, None, start
    while hi is None and rate <= ceiling:
        if run(rate, hold, "climb").clean:
            lo = rate
            rate = round(rate * factor, -2)
        else:
            hi = rate
            if lo == 0:  # not clean at the start: come down first (bounded)
                for _ in range(4):
                    rate = round(rate / factor, -2)
                    if run(rate, hold, "descend").clean:
                        lo = rate
                        break
                    hi = rate
                if lo == 0:
                    found.limited_by = "not clean even at the lowest rate tried"
                    return found
    for _ in range(bisect if hi is not None else 0):
        mid = round((lo + hi) / 2, -2)
        if mid <= lo or mid >= hi:
            break
        if run(mid, hold, "bisect").clean:
            lo = mid
        else:
            hi = mid
    found.first_lossy = hi
    for attempt in range(4):  # zero loss for the whole confirmation, else 10% lower
        step = run(lo, confirm, "confirm", searching=False)
        if step.clean:
            found.rate, found.confirmed = lo, step
            break
        found.first_lossy = lo
        lo = round(lo * 0.9, -2)
    else:
        found.limited_by = "no rate confirmed"
        return found
    found.over = run(round(1.2 * found.rate, -2), hold, "at 1.2x")
    failed = next((s for s in reversed(found.steps)
                   if s.rate == found.first_lossy and not s.clean), None)
    if failed is None:
        found.limited_by = "senders' ceiling: clean up to the highest rate tried"
    elif not failed.sent.ok:
        found.limited_by = (f"the senders: {failed.sent.rate:,.0f}/s of {failed.rate:,.0f} asked "
                            f"(receiver lost {failed.loss:,})")
    elif failed.loss:
        found.limited_by = "the receiver: datagrams lost"
    else:
        found.limited_by = "the receiver: fell behind (queue over 1/4 of the buffer)"
    return found


# -- profile ---------------------------------------------------------------------------------


def fill(sock: socket.socket, datagrams: list[bytes], count: int) -> None:
    port = sock.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.bind((HOST, 0))
        for i in range(count):
            out.sendto(datagrams[i % len(datagrams)], (HOST, port))


def batches_for(datagrams: list[bytes], n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    buf = np.zeros((n, width), dtype=np.uint8)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        head = datagrams[i][:width]
        buf[i, :len(head)] = np.frombuffer(head, dtype=np.uint8)
        lengths[i] = len(datagrams[i])
    return buf, lengths


def profile(datagrams: list[bytes], count: int = 40_000) -> None:
    from collector.decode import VXLAN_PORT
    from collector.decode import decode_batch as reference_decode_batch
    from collector.flows import FlowConfig, fast
    from collector.pipeline import Pipeline
    from collector.serve.config import Address, ServeConfig
    from collector.serve.receiver import Receiver, open_listener

    # the decoder serve runs: the compiled one when built (the numpy reference otherwise)
    decode_batch = fast.decode_batch if fast.available() else reference_decode_batch
    config = ServeConfig()
    sock, granted = open_listener(Address(HOST, 0), config.rcvbuf)
    print(f"\nprofile: one worker's path in this process, {count:,} datagrams pre-filled in a "
          f"socket (rcvbuf {granted >> 20} MiB), batch {config.batch}, slot {config.slot_bytes} B")
    try:
        def pipeline(tmp):
            return Pipeline(tmp, collector_id="bench", writer_id="w0", flow_config=FlowConfig(),
                            flush_seconds=config.flush_seconds)

        def raw(ancillary: bool) -> float:
            """The bare receive loop: recvmsg_into (with the ancillary buffer) or recv_into,
            nothing done with what arrives: the syscall and the interpreter's call."""
            fill(sock, datagrams, count)
            view = memoryview(bytearray(config.slot_bytes))
            flags = socket.MSG_TRUNC | socket.MSG_DONTWAIT
            space = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)
            started = time.perf_counter()
            try:
                if ancillary:
                    while True:
                        sock.recvmsg_into([view], space, flags)
                else:
                    while True:
                        sock.recv_into(view, 0, flags)
            except BlockingIOError:
                pass
            return time.perf_counter() - started

        def stages():
            fill(sock, datagrams, count)
            receiver = Receiver(sock, config.batch, config.slot_bytes)
            batches = []
            started = time.perf_counter()
            while True:
                rows = receiver.receive(time.time_ns())
                if rows == 0:
                    break
                batches.append((receiver.buf[:rows].copy(), receiver.lengths[:rows].copy(),
                                receiver.ts[:rows].copy()))
            t_receive = time.perf_counter() - started
            got = sum(len(b[1]) for b in batches)
            started = time.perf_counter()
            decoded = [decode_batch(buf, lengths, VXLAN_PORT) for buf, lengths, _ in batches]
            t_decode = time.perf_counter() - started
            with tempfile.TemporaryDirectory(prefix="bench-live-profile-") as tmp:
                p = pipeline(tmp)
                times = []
                for _ in range(2):  # first pass: ~10,000 new flows; second: all known
                    started = time.perf_counter()
                    for batch, (buf, lengths, ts) in zip(decoded, batches):
                        p.feed_decoded(batch, ts, buf, lengths)
                    times.append(time.perf_counter() - started)
                started = time.perf_counter()
                p.close()
                t_close = time.perf_counter() - started
            return (got, raw(False), raw(True), t_receive, t_decode, times[0], times[1], t_close)

        # the copy of each batch in stages() is not in serve's path; it is small (192 B rows)
        results = [stages() for _ in range(3)]
        got = results[0][0]
        med = [statistics.median(r[i] for r in results) for i in range(len(results[0]))]
        print(f"stages, no profiler, medians of 3 passes over {got:,} datagrams "
              f"(batches of up to {config.batch}):")
        for name, t in (("bare loop: sock.recv_into", med[1]),
                        ("bare loop: sock.recvmsg_into with the cmsg buffer", med[2]),
                        ("Receiver.receive (+ cmsg parsing, slot stores)", med[3]),
                        ("decode_batch (columnar)", med[4]),
                        ("Pipeline.feed_decoded, flows new (counters, flow table)", med[5]),
                        ("Pipeline.feed_decoded, flows known (steady state)", med[6])):
            print(f"  {name:58s} {t:6.3f} s  {t / got * 1e6:6.2f} us/datagram")
        total = med[3] + med[4] + med[6]
        print(f"  {'receive + decode + feed (flows known)':58s} {total:6.3f} s  "
              f"{total / got * 1e6:6.2f} us/datagram (-> {got / total:,.0f} datagrams/s per core)")
        print(f"  (close: exporting and writing the ~{FLOWS:,} flows: {med[7]:.3f} s)")
        fixed = []
        for n in (1, 32, 1024):
            buf, lengths = batches_for(datagrams, n, config.slot_bytes)
            reps = max(3, 3000 // n)
            started = time.perf_counter()
            for _ in range(reps):
                decode_batch(buf, lengths, VXLAN_PORT)
            fixed.append(f"{n} rows {(time.perf_counter() - started) / reps * 1e6:,.0f} us")
        print("  decode_batch per call: " + ", ".join(fixed))

        fill(sock, datagrams, count)
        receiver = Receiver(sock, config.batch, config.slot_bytes)
        with tempfile.TemporaryDirectory(prefix="bench-live-profile-") as tmp:
            p = pipeline(tmp)
            prof = cProfile.Profile()
            started = time.perf_counter()
            prof.enable()
            n = 0
            while True:
                rows = receiver.receive(time.time_ns())
                if rows == 0:
                    break
                n += rows
                p.feed(receiver.buf[:rows], receiver.lengths[:rows], receiver.ts[:rows], VXLAN_PORT)
            prof.disable()
            elapsed = time.perf_counter() - started
        print(f"\ncProfile: receive + feed of {n:,} datagrams: {elapsed:.2f} s "
              f"({elapsed / max(n, 1) * 1e6:.1f} us/datagram; cProfile slows per-call code)")
        stream = io.StringIO()
        stats = pstats.Stats(prof, stream=stream)
        stats.sort_stats("cumulative").print_stats(18)
        stats.sort_stats("tottime").print_stats(15)
        print(re.sub(r"\n{3,}", "\n\n", stream.getvalue().replace(str(ROOT) + "/", "")))
    finally:
        sock.close()


# -- report ----------------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
        except OSError:
            return "?"

    return [
        f"cpu: {model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.system()} {platform.release()}",
        f"net.core.rmem_max {sysctl('net.core.rmem_max')}, net.core.netdev_max_backlog "
        f"{sysctl('net.core.netdev_max_backlog')}, euid {os.geteuid()} "
        f"({'SO_RCVBUFFORCE: 64 MiB buffers' if os.geteuid() == 0 else 'no SO_RCVBUFFORCE'})",
        f"python {platform.python_version()}, numpy {np.__version__}, collector {collector.__version__}, "
        f"{subprocess.run(['gcc', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}",
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=10.0, help="seconds per search step (default 10)")
    parser.add_argument("--confirm", type=float, default=30.0,
                        help="seconds of the confirmation at the rate found (default 30)")
    parser.add_argument("--workers", default="1,2", help="serve --workers values (default 1,2)")
    parser.add_argument("--start", type=float, default=20_000, help="first rate for serve (20000)")
    parser.add_argument("--c-start", type=float, default=100_000, help="first rate for C (100000)")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps (default 3)")
    parser.add_argument("--sockets", type=int, default=256, help="source sockets per sender (256)")
    parser.add_argument("--batch", type=int, default=32, help="sendmmsg batch (default 32)")
    parser.add_argument("--no-c", action="store_true", help="skip the C receiver")
    parser.add_argument("--profile", action="store_true", help="also profile a worker in process")
    args = parser.parse_args()
    if not (0 < args.hold <= 120 and 0 < args.confirm <= 120):
        parser.error("--hold and --confirm must be in (0, 120] seconds")
    began = time.monotonic()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ensure_gcc, machine_info as common_info

    for line in machine_info() + common_info()[1:]:  # + the load and compiled extensions
        print(line)
    if ensure_gcc() is None:
        sys.exit("gcc is needed to build the C senders and receiver")

    started = time.perf_counter()
    datagrams = make_datagrams()
    sizes = np.array([len(d) for d in datagrams])
    mean = float(sizes.mean())
    cut = sum(1 for d in datagrams if len(d) == 8 + CUT)
    print(f"datagrams: {len(datagrams):,} over {FLOWS:,} flows, built with collector.build in "
          f"{time.perf_counter() - started:.1f} s; UDP payload {sizes.min()}-{sizes.max()} B, "
          f"mean {mean:.0f} B, median {np.median(sizes):.0f} B; {cut:,} cut to {CUT} B of frame")

    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        tmp = Path(tmp)
        sender_bin, receiver_bin = compile_c(tmp)
        write_datagrams(tmp / "datagrams.bin", datagrams)
        senders = Senders(sender_bin, tmp / "datagrams.bin", len(datagrams), args.sockets, args.batch)
        c = CReceiver(receiver_bin, senders)

        print("\nsenders' ceiling (flat out for 3 s into the C receiver; it decides when a "
              "second sender joins: above 80% of one's):")
        ceilings = {}
        for k in (1, 2):
            step = c.step(0, 3.0, processes=k)
            ceilings[k] = step.sent.rate
            print(f"  {k} sender(s): {step.sent.rate:,.0f} datagrams/s sent, C receiver got "
                  f"{step.received:,} of {step.sent.sent:,} (drops {step.kernel_drops:,})")
        senders.one_sender_ceiling = ceilings[1]

        results = []
        if not args.no_c:
            print(f"\nC receiver (recvmmsg, batch 64, one process):")
            results.append(search(c, args.c_start, args.hold, args.confirm, args.bisect))
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"\ncollector serve --workers {workers}:")
            results.append(search(Serve(workers, senders, tmp), args.start, args.hold,
                                  args.confirm, args.bisect))

    if args.profile:
        profile(datagrams)

    print(f"\nsenders' ceiling: {ceilings[1]:,.0f}/s with one sender, {ceilings[2]:,.0f}/s with two")
    print(f"max zero-loss rate, confirmed for {args.confirm:.0f} s; Mbps = UDP payload (mean "
          f"{mean:.0f} B) at that rate; drops at 1.2x held {args.hold:.0f} s")
    print(f"{'receiver':30s} {'workers':>7s} {'max zero-loss/s':>15s} {'Mbps':>5s} "
          f"{'first failed/s':>14s} {'@1.2x: loss':>11s} {'SO_RXQ_OVFL':>11s} {'socket drops':>12s} "
          f"{'cpu us/dgram':>12s}  limited by")
    for f in results:
        workers = f.label.rsplit(" ", 1)[1] if "serve" in f.label else "1"
        over = f.over
        cpu = (f"{(f.confirmed.cpu_user + f.confirmed.cpu_system) / f.confirmed.received * 1e6:.2f}"
               if f.confirmed and f.confirmed.received else "-")
        print(f"{f.label:30s} {workers:>7s} {f.rate:15,.0f} {f.rate * mean * 8 / 1e6:5.0f} "
              f"{(f.first_lossy or 0):14,.0f} {(over.loss if over else 0):11,d} "
              f"{(over.kernel_drops if over else 0):11,d} {(over.socket_drops if over else 0):12,d} "
              f"{cpu:>12s}  {f.limited_by}"
              + (f" (sent {over.sent.rate:,.0f}/s at 1.2x)" if over and not over.sent.ok else ""))
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"wall time {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
