"""Replay benchmark: `collector replay --topspeed` beside `tcpreplay --topspeed -i lo`.

    python bench/replay.py [--packets N] [--flows F] [--runs R] [--port P] [--profile]

Generates (fixed seed; cached under the temp dir keyed by the parameters, so a re-run skips
it) a plain capture as taken on a mirrored instance: F flows over N packets, 80/20
IPv4/IPv6, 70% TCP, 25% UDP, 5% ICMP echo, both directions, IP sizes 40% 40-100 B, 30%
552-600 B, 30% 1400-1500 B. Beside it, the same traffic pre-encapsulated as the appliance
would receive it from 127.0.0.1: Ethernet / IPv4 127.0.0.1 -> 127.0.0.1 / UDP from the flow's
outer source port to P / VXLAN (the datagrams `collector replay --vni 7159709` sends), so
that tcpreplay can put the same datagrams on the loopback interface.

Then, each run a fresh process, runs interleaved, medians of R, into a sink that holds what
reaches a UDP socket on 127.0.0.1:P (SO_RCVBUFFORCE 1 GiB) and counts it only after the sender
exited, so that it takes no CPU from the senders while they run:

    collector replay PLAIN --vni 7159709 --topspeed --target 127.0.0.1:P
    collector replay PLAIN --vni 7159709 --topspeed --workers 2 --target 127.0.0.1:P
    collector replay TWIN --as-captured --topspeed --target 127.0.0.1:P   (with --as-captured)
    tcpreplay --topspeed -i lo TWIN
    tcpreplay --topspeed -K -i lo TWIN   (the capture read into memory before its clock)
    the C sendmmsg ceiling, 1 and 2 processes (CEILING_C below: the same datagrams from the
    same source ports in the same order, sockets opened before its clock starts; gcc)

Rates are the tools' own ("Rated: ... pps"); every datagram must reach the sink.
tcpreplay's frames from 127.0.0.1 arriving on lo are only delivered with
net.ipv4.conf.lo.route_localnet=1 and accept_local=1: the benchmark sets both for its run and
restores them. tcpreplay is installed with apt-get when missing (bench/common.py); when
that fails its row is skipped, saying so. --profile runs one replay in this process under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from collector import build, compiled  # noqa: E402
from collector.capture import read_capture  # noqa: E402
from collector.replay import BATCH  # noqa: E402
from collector.replay.encap import Encapsulator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, ensure_apt, ip_size, print_header, sysctls  # noqa: E402

SEED = 20261126
GENERATOR = 1  # bump when the generated traffic changes: it keys the cache
VNI = 7159709
START_NS = 1_767_225_600 * 10**9
SYSCTLS = ("net/ipv4/conf/lo/route_localnet", "net/ipv4/conf/lo/accept_local")

SINK = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:  # SO_RCVBUFFORCE (33 on Linux; root) passes net.core.rmem_max
    sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 30)
except OSError:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 30)
sock.bind(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
sys.stdin.readline()  # the sender is done: only now count what the queue holds
sock.setblocking(False)
buf = bytearray(65536)
count = size = 0
try:
    while True:
        size += sock.recv_into(buf)
        count += 1
except BlockingIOError:
    pass
print(count, size, flush=True)
"""


# The kernel's ceiling for what `collector replay` does: the same datagrams in the order
# collector's batch path sends them (the benchmark writes them to a file: port u16, length
# u32, payload), each from a UDP socket bound to its flow's source port and connected to the
# target, all opened before the clock starts; one sendmmsg per run of datagrams of one socket
# (at most 1,024). With W > 1, W forked processes share the datagrams by source port modulo
# W, each sending its own in file order. It prints tcpreplay-style summary lines.
CEILING_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#define RUN 1024
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
    if (argc != 5) return fprintf(stderr, "usage: DATAGRAMS HOST PORT WORKERS\\n"), 2;
    FILE *f = fopen(argv[1], "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st)) return perror(argv[1]), 1;
    uint8_t *blob = malloc(st.st_size);
    if (fread(blob, 1, st.st_size, f) != (size_t)st.st_size) return perror("read"), 1;
    long n = 0, cap = 1 << 16;
    uint8_t **data = malloc(cap * sizeof *data);
    uint32_t *len = malloc(cap * sizeof *len);
    uint16_t *port = malloc(cap * sizeof *port);
    for (long at = 0; at + 6 <= st.st_size; n++) {
        if (n == cap) {
            cap *= 2;
            data = realloc(data, cap * sizeof *data);
            len = realloc(len, cap * sizeof *len);
            port = realloc(port, cap * sizeof *port);
        }
        memcpy(&port[n], blob + at, 2);
        memcpy(&len[n], blob + at + 2, 4);
        data[n] = blob + at + 6;
        at += 6 + len[n];
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &to.sin_addr);
    static int sock_of[65536];
    for (long i = 0; i < n; i++) {
        if (!sock_of[port[i]]) {
            int s = socket(AF_INET, SOCK_DGRAM, 0);
            struct sockaddr_in from = {.sin_family = AF_INET, .sin_port = htons(port[i])};
            bind(s, (struct sockaddr *)&from, sizeof from);  /* taken: an ephemeral port */
            if (connect(s, (struct sockaddr *)&to, sizeof to)) return perror("connect"), 1;
            sock_of[port[i]] = s;
        }
    }
    int workers = atoi(argv[4]), me = 0;
    double start = now();
    if (workers > 1) {
        for (me = 0; me < workers; me++)
            if (fork() == 0) break;
        if (me == workers) {
            while (wait(NULL) > 0) {}
            double t = now() - start;
            printf("Actual: %ld packets (0 bytes) sent in %.2f seconds\\n"
                   "Rated: 0.0 Bps, 0.00 Mbps, %.2f pps\\n", n, t, n / t);
            return 0;
        }
    }
    struct mmsghdr msgs[RUN];
    struct iovec iov[RUN];
    long sent = 0;
    for (long i = 0; i < n;) {
        if (workers > 1 && port[i] % workers != me) {
            i++;
            continue;
        }
        int m = 0, p = port[i];
        for (; i < n && m < RUN; i++) {  /* this worker's next datagrams while on one port */
            if (workers > 1 && port[i] % workers != me) continue;
            if (port[i] != p) break;
            iov[m].iov_base = data[i];
            iov[m].iov_len = len[i];
            memset(&msgs[m], 0, sizeof msgs[m]);
            msgs[m].msg_hdr.msg_iov = &iov[m];
            msgs[m].msg_hdr.msg_iovlen = 1;
            m++;
        }
        for (int done = 0; done < m;) {
            int r = sendmmsg(sock_of[p], msgs + done, m - done, 0);
            if (r < 0) return perror("sendmmsg"), 1;
            done += r;
            sent += r;
        }
    }
    if (workers > 1) return 0;
    double t = now() - start;
    printf("Actual: %ld packets (0 bytes) sent in %.2f seconds\\n"
           "Rated: 0.0 Bps, 0.00 Mbps, %.2f pps\\n", sent, t, sent / t);
    return 0;
}
"""


def ceiling(plain: Path, key: str) -> tuple[Path, Path] | None:
    """(the C sender, the datagrams of `plain` as collector replay --vni sends them), built and
    written once into the cache; None without gcc."""
    if ensure_apt("gcc") is None:
        return None
    cache = cache_dir("replay")
    binary, source = cache / "replay-ceiling", cache / "replay-ceiling.c"
    if not binary.exists() or not source.exists() or source.read_text() != CEILING_C:
        source.write_text(CEILING_C)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    datagrams = cache / f"{key}-datagrams-v2.bin"
    if not datagrams.exists():
        encapsulator = Encapsulator(vni=VNI)
        mirrored = [encapsulator.mirror(record) for record in read_capture(plain)]
        with open(datagrams.with_suffix(".tmp"), "wb") as f:
            for i in send_order(mirrored):
                f.write(struct.pack("<HI", mirrored[i].source_port, len(mirrored[i].payload)))
                f.write(mirrored[i].payload)
        datagrams.with_suffix(".tmp").rename(datagrams)
    return binary, datagrams


def send_order(mirrored: list) -> list[int]:
    """The order collector's batch path sends these datagrams in: each batch grouped by
    source port as far as every conversation's order allows (collector._fastio.group_by_fd);
    capture order without the compiled extension."""
    fast = compiled.extension("_fastio")
    if fast is None:
        return list(range(len(mirrored)))
    ports = np.array([m.source_port for m in mirrored], np.int64)
    conversations = np.array([hash(m.conversation) for m in mirrored], np.int64)
    order = np.empty(len(mirrored), np.int64)
    for first in range(0, len(mirrored), BATCH):
        last = min(first + BATCH, len(mirrored))
        fast.group_by_fd(ports[first:last], conversations[first:last], order[first:last])
        order[first:last] += first
    return order.tolist()


# -- the captures ------------------------------------------------------------------------------


def write_pcap(path: Path, frames) -> None:
    """A classic little-endian nanosecond pcap of (timestamp ns, frame) pairs, Ethernet."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for ts, frame in frames:
            f.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), len(frame)))
            f.write(frame)


def flows(count: int, rng: random.Random) -> list[tuple]:
    """(version, proto, client, server, client port, server port) per flow."""
    out = []
    for i in range(count):
        v6 = rng.random() < 0.2
        pick = rng.random()
        proto = build.TCP if pick < 0.7 else build.UDP if pick < 0.95 else (
            build.ICMPV6 if v6 else build.ICMP)
        if v6:
            client, server = f"2001:db8:1::{i + 1:x}", f"2001:db8:3::{rng.randint(1, 50):x}"
        else:
            client = f"10.1.{i // 250}.{i % 250 + 1}"
            server = f"10.3.0.{rng.randint(1, 50)}"
        sport = rng.randint(32768, 60999)
        dport = rng.choice((443, 80, 53, 8080, 5432)) if proto in (build.TCP, build.UDP) else 0
        out.append((6 if v6 else 4, proto, client, server, sport, dport))
    return out


def packet(flow: tuple, forward: bool, size: int, seq: int) -> bytes:
    version, proto, client, server, cport, sport = flow
    src, dst = (client, server) if forward else (server, client)
    sp, dp = (cport, sport) if forward else (sport, cport)
    ip_header = 40 if version == 6 else 20
    if proto == build.TCP:
        body = bytes(max(0, size - ip_header - 20))
        l4 = build.tcp(body, sport=sp, dport=dp, flags=build.ACK | build.PSH, seq=seq,
                       ip_src=src, ip_dst=dst)
    elif proto == build.UDP:
        l4 = build.udp(bytes(max(0, size - ip_header - 8)), sport=sp, dport=dp, ip_src=src,
                       ip_dst=dst)
    else:
        echo = 8 if version == 4 else 128
        reply = 0 if version == 4 else 129
        l4 = build.icmp(echo if forward else reply, 0, bytes(max(4, size - ip_header - 4)),
                        ip_src=src, ip_dst=dst)
    if version == 6:
        return build.ethernet(build.ipv6(l4, src=src, dst=dst, next_header=proto),
                              ethertype=build.ETH_IPV6)
    return build.ethernet(build.ipv4(l4, src=src, dst=dst, proto=proto, ident=seq & 0xFFFF))


def generate(packets: int, flow_count: int, port: int) -> tuple[Path, Path]:
    cache = cache_dir("replay")
    key = f"g{GENERATOR}-s{SEED}-n{packets}-f{flow_count}"
    plain, twin = cache / f"{key}-plain.pcap", cache / f"{key}-twin-p{port}.pcap"
    if not plain.exists():
        print(f"generating {plain} ...", file=sys.stderr)
        rng = random.Random(SEED)
        table = flows(flow_count, rng)
        weights = [rng.paretovariate(1.2) for _ in table]
        chosen = rng.choices(range(flow_count), weights, k=packets)
        frames = ((START_NS + i * 1000, packet(table[f], rng.random() < 0.55, ip_size(rng), i))
                  for i, f in enumerate(chosen))
        write_pcap(plain.with_suffix(".tmp"), frames)
        plain.with_suffix(".tmp").rename(plain)
    if not twin.exists():
        print(f"generating {twin} ...", file=sys.stderr)
        encapsulator = Encapsulator(vni=VNI)

        def wrapped():
            for record in read_capture(plain):
                mirrored = encapsulator.mirror(record)
                datagram = build.udp(mirrored.payload, sport=mirrored.source_port, dport=port)
                ip = build.ipv4(datagram, src="127.0.0.1", dst="127.0.0.1", proto=build.UDP,
                                ttl=255)
                yield record.timestamp_ns, build.ethernet(ip, src=bytes(6), dst=bytes(6))

        write_pcap(twin.with_suffix(".tmp"), wrapped())
        twin.with_suffix(".tmp").rename(twin)
    return plain, twin


# -- running ------------------------------------------------------------------------------------


class Sink:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SINK, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.wait()
            raise SystemExit(f"the sink could not bind 127.0.0.1:{port} (in use? pass --port)")

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate("count\n", timeout=120)
        count, size = out.split()
        return int(count), int(size)


def udp_rcvbuf_errors() -> int:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("RcvbufErrors")])


RATED = re.compile(r"Rated: ([\d.]+) Bps, ([\d.]+) Mbps, ([\d.]+) pps")
ACTUAL = re.compile(r"Actual: (\d+) packets \((\d+) bytes\) sent in ([\d.]+) seconds")


def run_once(command: list[str], port: int) -> dict:
    sink = Sink(port)
    drops = udp_rcvbuf_errors()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    received, _ = sink.result()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    rated, actual = RATED.search(done.stdout), ACTUAL.search(done.stdout)
    if rated is None or actual is None:
        raise SystemExit(f"no summary from {' '.join(command)}:\n{done.stdout}{done.stderr}")
    return {"packets": int(actual[1]), "seconds": float(actual[3]), "pps": float(rated[3]),
            "mbps": float(rated[2]), "received": received,
            "sink_drops": udp_rcvbuf_errors() - drops}


class Sysctls:
    """Set the loopback sysctls tcpreplay's frames need; restore them on exit."""

    def __init__(self) -> None:
        self.saved: dict[str, str] = {}

    def __enter__(self) -> Sysctls:
        for name in SYSCTLS:
            path = Path("/proc/sys") / name
            self.saved[name] = path.read_text().strip()
            path.write_text("1\n")
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            (Path("/proc/sys") / name).write_text(value + "\n")


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def tcpreplay_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()
    return first[0] if first else "tcpreplay"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--flows", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=4789)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--as-captured", action="store_true",
                        help="also time collector replay --as-captured of the twin")
    args = parser.parse_args()
    print_header("replay: collector replay --topspeed vs tcpreplay --topspeed")
    plain, twin = generate(args.packets, args.flows, args.port)
    target = f"127.0.0.1:{args.port}"
    collector = [sys.executable, "-m", "collector", "replay", "--topspeed", "--target", target]
    if args.profile:
        profile(plain, target)
    if args.runs < 1:
        return
    rows = {
        "collector replay --vni (plain capture, VXLAN)": collector + [str(plain), "--vni",
                                                                      str(VNI)],
        "collector replay --vni --workers 2": collector + [str(plain), "--vni", str(VNI),
                                                           "--workers", "2"],
    }
    if args.as_captured:
        rows["collector replay --as-captured (the twin)"] = collector + [str(twin),
                                                                         "--as-captured"]
    tcpreplay = ensure_apt("tcpreplay")
    if tcpreplay is None:
        print("tcpreplay is not installed (apt-get install tcpreplay): its row is skipped")
    else:
        rows["tcpreplay --topspeed -i lo (the twin)"] = [tcpreplay, "--topspeed", "-i", "lo",
                                                         str(twin)]
        # -K reads the whole capture into memory before its clock starts (the targets are
        # against the plain command; this row says how much of tcpreplay's time is reading)
        rows["tcpreplay --topspeed -K (preloaded)"] = [tcpreplay, "--topspeed", "-K", "-i",
                                                       "lo", str(twin)]
    built = ceiling(plain, f"g{GENERATOR}-s{SEED}-n{args.packets}-f{args.flows}")
    if built is None:
        print("gcc is not installed: the C sendmmsg ceiling rows are skipped")
    else:
        binary, datagrams = built
        for workers in (1, 2):
            rows[f"C sendmmsg ceiling, {workers} process{'es' if workers > 1 else ''}"] = [
                str(binary), str(datagrams), "127.0.0.1", str(args.port), str(workers)]
    results: dict[str, list[dict]] = {name: [] for name in rows}
    with sysctls({name.replace("/", "."): "1" for name in SYSCTLS}):
        for _ in range(args.runs):
            for name, command in rows.items():
                results[name].append(run_once(command, args.port))
    print(machine())
    if tcpreplay is not None:
        print(tcpreplay_version(tcpreplay))
    print(f"{args.packets:,} packets, {args.flows:,} flows, to a UDP sink on {target}; "
          f"medians of {args.runs} runs")
    print(f"{'sender':<48}{'seconds':>9}{'packets/s':>12}{'Mbps':>9}{'at sink':>10}")
    medians = {}
    for name, runs in results.items():
        med = {key: statistics.median(run[key] for run in runs)
               for key in ("seconds", "pps", "mbps", "received")}
        medians[name] = med
        print(f"{name:<48}{med['seconds']:>9.2f}{med['pps']:>12,.0f}{med['mbps']:>9.1f}"
              f"{med['received']:>10,.0f}")
    for name, runs in results.items():
        short = [run for run in runs if run["received"] != run["packets"]]
        if short:
            print(f"WARNING {name}: the sink got {short[0]['received']:,} of "
                  f"{short[0]['packets']:,} datagrams in {len(short)} run(s)")
    if tcpreplay is not None:
        theirs = medians["tcpreplay --topspeed -i lo (the twin)"]["pps"]
        for name, target_ratio in (("collector replay --vni (plain capture, VXLAN)", 1.0),
                                   ("collector replay --vni --workers 2", 1.5),
                                   ("collector replay --as-captured (the twin)", None),
                                   ("C sendmmsg ceiling, 1 process", None),
                                   ("C sendmmsg ceiling, 2 processes", None),
                                   ("tcpreplay --topspeed -K (preloaded)", None)):
            if name not in medians:
                continue
            ratio = medians[name]["pps"] / theirs
            verdict = "" if target_ratio is None else (
                f" ({'met' if ratio >= target_ratio else 'NOT met'}: >= {target_ratio}x)")
            print(f"ratio {name} / tcpreplay: {ratio:.2f}{verdict}")
        for ours, ceiling_row in (("collector replay --vni (plain capture, VXLAN)",
                                   "C sendmmsg ceiling, 1 process"),
                                  ("collector replay --vni --workers 2",
                                   "C sendmmsg ceiling, 2 processes"),
                                  ("collector replay --vni (plain capture, VXLAN)",
                                   "tcpreplay --topspeed -K (preloaded)"),
                                  ("collector replay --vni --workers 2",
                                   "tcpreplay --topspeed -K (preloaded)")):
            if ours in medians and ceiling_row in medians:
                print(f"ratio {ours} / {ceiling_row}: "
                      f"{medians[ours]['pps'] / medians[ceiling_row]['pps']:.2f}")


def profile(plain: Path, target: str) -> None:
    from collector.replay import ReplayOptions, replay

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    summary = replay([plain], f"127.0.0.1:{port}", ReplayOptions(vni=VNI, topspeed=True))
    profiler.disable()
    print(f"profiled: {summary.packets} packets in {time.perf_counter() - started:.2f} s")
    sink.close()
    stats = pstats.Stats(profiler).sort_stats("tottime")
    stats.print_stats(15)


if __name__ == "__main__":
    main()
