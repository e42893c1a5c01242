"""The flow journal's cost: one snapshot of the flow table per flush interval.

    python bench/journal.py [--flows 100000,1000000] [--runs 3]

For each count of open flows F: a pipeline (serve's: compiled when built, journal on) meters
one UDP datagram of each of F flows, then the journal is written `--runs` times (what a worker
does every `flush_seconds`, 10 s by default); prints the median time of one journal write, its
size on disk, and that time as a share of a 10 s flush interval of one core; then the time
`recover` takes to write those flows as Parquet after a kill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector import build  # noqa: E402
from collector.pipeline import Pipeline  # noqa: E402
from collector.store import journal  # noqa: E402

WIDTH, BATCH = 128, 1024
T0 = 1_790_000_000 * 10**9


def template() -> tuple[bytes, int]:
    spec = build.FrameSpec(ip_version=4, proto=build.UDP, src="10.99.0.0", dst="10.200.0.1",
                           sport=40000, dport=53, payload=b"q" * 40)
    datagram = build.vxlan(build.mirrored_frame(spec).data, vni=7)
    return datagram, datagram.index(bytes([10, 99, 0, 0]))


def feed(p: Pipeline, flows: int) -> None:
    datagram, at = template()
    row = np.frombuffer(datagram, np.uint8)
    for start in range(0, flows, BATCH):
        n = min(BATCH, flows - start)
        buf = np.zeros((n, WIDTH), np.uint8)
        buf[:, :len(row)] = row
        ids = np.arange(start, start + n, dtype=np.uint32)
        buf[:, at + 1] = (ids >> 16) & 255  # 10.x.y.z: one flow per source address
        buf[:, at + 2] = (ids >> 8) & 255
        buf[:, at + 3] = ids & 255
        p.feed(buf, np.full(n, len(datagram), np.int64), T0 + ids.astype(np.int64) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="100000,1000000")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"compiled flow table: {Pipeline('/tmp', collector_id='x').compiled}")
    print(f"{'open flows':>10} {'journal write':>14} {'size':>10} {'share of 10 s':>14} "
          f"{'recover':>9}")
    for flows in (int(f) for f in args.flows.split(",")):
        with tempfile.TemporaryDirectory(dir="/tmp") as root:
            p = Pipeline(root, collector_id="bench", writer_id="w0", journal=True,
                         max_rows=10**7)
            feed(p, flows)
            assert len(p.flows) == flows, len(p.flows)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                p._write_journal()
                times.append(time.perf_counter() - started)
            size = journal.journal_path(root, "bench", "w0").stat().st_size
            started = time.perf_counter()
            recovered = journal.recover(root, "bench", "w0")
            recover_s = time.perf_counter() - started
            assert recovered == flows, recovered
            median = statistics.median(times)
            print(f"{flows:>10,} {median * 1000:>11.0f} ms {size / 2**20:>7.1f} MiB "
                  f"{median / 10:>13.1%} {recover_s:>7.2f} s")


if __name__ == "__main__":
    main()
