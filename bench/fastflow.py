"""Pipeline.feed, pure Python vs compiled (collector._fastflow), and flow-table memory.

    python bench/fastflow.py [--packets N] [--python-packets N] [--flows F] [--memory-flows M]

1. ns/packet of `Pipeline.feed` (decode, flow table, ended flows to Arrow) over N VXLAN
   datagrams of F flows in receive slots of 128 bytes, batches of 1024 (serve's default),
   and of the final `close()` that exports and writes every flow to Parquet. The pure-Python
   path runs on the first `--python-packets` of the same datagrams (it is ~100x slower).
   The traffic mix: IPv4/IPv6 (80/20), TCP/UDP/ICMP, sizes 60-1500 bytes, one copy in ten cut
   to 25 bytes, flows chosen at random per packet, timestamps 1 us apart.
2. Bytes of memory per active flow at M concurrent flows: the RSS growth of a process that
   meters one packet of each of M distinct flows (slab allocated first), divided by M; the
   C table's own count of its bytes beside it.

Prints medians of `--runs` runs and the machine it ran on. Compare ratios within one run: the
absolute speed of this machine drifts with its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector import build  # noqa: E402

WIDTH = 128
BATCH = 1024


def traffic(count: int, flows: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`count` datagrams of `flows` flows as receive slots (first WIDTH bytes) and lengths."""
    rng = random.Random(seed)
    templates, lengths = [], []
    for _ in range(flows):
        v6 = rng.random() < 0.2
        proto = rng.choice((build.TCP, build.TCP, build.UDP, build.ICMPV6 if v6 else build.ICMP))
        src = f"fd00::{rng.randrange(1, 65535):x}" if v6 else f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        dst = f"fd00::{rng.randrange(1, 65535):x}" if v6 else f"172.31.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        size = rng.choice((0, 0, 40, 512, 1200, 1400))
        spec = build.FrameSpec(ip_version=6 if v6 else 4, proto=proto, src=src, dst=dst,
                               sport=rng.randrange(1024, 65535), dport=rng.choice((443, 80, 53, 5432)),
                               tcp_flags=build.ACK, payload=bytes(size))
        frame = build.mirrored_frame(spec).data
        datagram = build.vxlan(frame[:25] if rng.random() < 0.1 else frame, vni=7159709)
        templates.append(np.frombuffer(datagram[:WIDTH].ljust(WIDTH, b"\0"), dtype=np.uint8))
        lengths.append(len(datagram))
    templates, lengths = np.stack(templates), np.array(lengths, dtype=np.int64)
    pick = np.random.default_rng(seed).integers(0, flows, count)
    return templates[pick], lengths[pick]


def feed_once(buf, lengths, pure: bool) -> tuple[float, float, int]:
    """(seconds in feed, seconds in close, flows exported) in a fresh child process."""
    code = f"""
import sys, time, tempfile, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from collector.pipeline import Pipeline
d = np.load({NPZ!r})
buf, lengths = d["buf"][:{len(buf)}], d["lengths"][:{len(buf)}]
ts = 10**18 + np.arange(len(buf), dtype=np.int64) * 1000
p = Pipeline(tempfile.mkdtemp(), collector_id="bench", flush_seconds=3600)
assert p.compiled == {not pure}
started = time.perf_counter()
for k in range(0, len(buf), {BATCH}):
    p.feed(buf[k:k + {BATCH}], lengths[k:k + {BATCH}], ts[k:k + {BATCH}])
fed = time.perf_counter()
p.close()
print(fed - started, time.perf_counter() - fed, p.counters.flows_exported)
"""
    env = dict(os.environ, COLLECTOR_PURE_PYTHON="1" if pure else "0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def memory_once(flows: int, pure: bool) -> tuple[float, int]:
    """(bytes of RSS per active flow, the C table's own bytes or 0) in a fresh child."""
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from collector import build
from collector.flows import FlowConfig, FlowTable, fast

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

flows, chunk = {flows}, 8192
frame = build.mirrored_frame(build.FrameSpec(tcp_flags=build.ACK)).data
row = np.frombuffer(build.vxlan(frame, vni=1).ljust(128, b"\\0")[:128], dtype=np.uint8)
buf = np.tile(row, (chunk, 1))
lengths = np.full(chunk, 8 + len(frame), dtype=np.int64)
ts = np.zeros(chunk, dtype=np.int64)
decode = fast.decode_batch if {not pure} else __import__("collector.decode", fromlist=["x"]).decode_batch
config = FlowConfig(max_flows=flows, idle_timeout=1e6, active_timeout=1e6)
table = fast.FastFlowTable(config) if {not pure} else FlowTable(config)
ids = np.arange(chunk, dtype=np.int64)
decode(buf, lengths)  # warm up numpy and the decoder
base = rss()
for start in range(0, flows, chunk):
    n = min(chunk, flows - start)
    flow = ids[:n] + start
    # source address 10.a.b.c and source port: every row its own flow
    buf[:n, 8 + 14 + 13] = (flow >> 16) & 0xFF
    buf[:n, 8 + 14 + 14] = (flow >> 8) & 0xFF
    buf[:n, 8 + 14 + 15] = flow & 0xFF
    buf[:n, 8 + 14 + 20] = (flow >> 24) & 0xFF
    batch = decode(buf[:n], lengths[:n])
    table.add_batch(batch, ts[:n])
    del batch
assert len(table) == flows, len(table)
print((rss() - base) / flows, table.memory() if {not pure} else 0)
"""
    env = dict(os.environ, COLLECTOR_PURE_PYTHON="1" if pure else "0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    global NPZ
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--python-packets", type=int, default=100_000)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--memory-flows", type=int, default=1_000_000)
    parser.add_argument("--python-memory-flows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    buf, lengths = traffic(args.packets, args.flows)
    with tempfile.TemporaryDirectory() as tmp:
        NPZ = os.path.join(tmp, "traffic.npz")
        np.savez(NPZ, buf=buf, lengths=lengths)
        print(f"Pipeline.feed, {args.flows} flows, slots of {WIDTH} bytes, batches of {BATCH}; "
              f"median of {args.runs}:")
        results = {}
        for pure, count in ((False, args.packets), (True, min(args.python_packets, args.packets))):
            runs = [feed_once(buf[:count], lengths[:count], pure) for _ in range(args.runs)]
            feed = statistics.median(r[0] for r in runs) / count * 1e9
            close = statistics.median(r[1] for r in runs) / count * 1e9
            results[pure] = feed + close
            name = "python " if pure else "compiled"
            print(f"  {name}: {count:>9} packets  feed {feed:8.0f} ns/packet  close {close:6.0f} ns/packet"
                  f"  => {1e9 / (feed + close):>10,.0f} packets/s ({runs[0][2]} flows)")
        print(f"  speed-up: {results[True] / results[False]:.1f}x")
    print("Memory per active flow (RSS growth / flows):")
    for pure, flows in ((False, args.memory_flows), (True, args.python_memory_flows)):
        if flows <= 0:
            continue
        per_flow, own = memory_once(flows, pure)
        name = "python " if pure else "compiled"
        extra = f" (the table's own count: {own / flows:.0f} bytes)" if own else ""
        print(f"  {name}: {flows:>9} flows  {per_flow:6.0f} bytes/flow{extra}")


if __name__ == "__main__":
    main()
