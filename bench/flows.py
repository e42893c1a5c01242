"""Flow-state and storage benchmark: memory per active flow, Parquet bytes per flow row, and
query latency over 10,000,000 flows.

    python bench/flows.py [--active N] [--rows N] [--runs R]

1. Memory per active flow: `collector ingest` (a fresh process, peak RSS from wait4) of two
   VXLAN appliance captures of bench/ingest.py's generator with the same packet count N:
   one with N flows (one packet each), and the ingest part's capture (10,000 flows; shared
   cache). Every flow stays active to the end (50 s of traffic, under the 60 s timeouts),
   so the difference of the peaks over the difference of the flows is what one active flow
   costs, input buffers and code alike cancelling out.
   The peak includes exporting all N flows to Arrow and Parquet at the end, so this is the
   process's cost per flow, not the flow table's alone. For the table alone:
1b. The flow table in this process (collector.flows.fast.FastFlowTable, the C table that
   `Pipeline.feed` uses): N distinct UDP flows of synthetic VXLAN datagrams fed in batches of
   4096 through the compiled decode_batch; bytes per active flow by the table's own account
   (`memory()`) and by this process's RSS growth.
2. Parquet bytes per flow row: the files that ingest of N flows wrote, over their rows.
3. Queries over --rows (10,000,000) flow rows generated directly as Parquet (numpy + Arrow,
   fixed seed) through collector's own DatasetWriter in the dataset layout (hour
   partitions over 24 hours, 4 sessions, 200,000 addresses, heavy-tailed sizes, 3% of flows
   with truncated copies), cached under the bench cache. Each query through
   `collector.query.connect` (the views `collector query` uses): the first run (cold, a new
   connection) and the median of R warm runs.

Targets (issue 6): <= 200 bytes per active flow at 1,000,000 flows, <= 40 bytes of Parquet
per flow row, each query < 1 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cache_dir, median, print_header  # noqa: E402

import ingest  # noqa: E402  (its capture generator and process measurement)

QUERIES = {
    "top talkers": """
        SELECT src_addr, sum(bytes + rev_bytes) AS total_bytes, count(*) AS flows
        FROM flows GROUP BY src_addr ORDER BY total_bytes DESC LIMIT 10""",
    # 5-minute buckets as integers, turned into timestamps once per group: bucketing the
    # TIMESTAMPTZ itself (time_bucket, date_trunc) goes through time zone code per row and
    # took 2.5x as long here
    "per-session bytes over time (5 min)": """
        SELECT session_id, to_timestamp(bucket * 300) AS bucket_start, total_bytes
        FROM (SELECT session_id, epoch_us(first_seen) // 300000000 AS bucket,
                     sum(bytes + rev_bytes) AS total_bytes
              FROM flows GROUP BY session_id, bucket)
        ORDER BY session_id, bucket_start""",
    "truncated share per session": """
        SELECT session_id,
               sum(truncated_packets + rev_truncated_packets) / sum(packets + rev_packets)
                 AS truncated_share
        FROM flows GROUP BY session_id ORDER BY session_id""",
}
SEED = 20261126
GENERATOR = 2  # bump when the generated rows or their files change: it keys the cache


# -- 1 and 2: an ingest's memory and files ------------------------------------------------------


def ingest_peak(path: Path, data: Path) -> float:
    cmd = [*ingest.collector_command(), "ingest", str(path), "--data", str(data),
           "--collector-id", "bench"]
    _, rss, _, _ = ingest.measure(cmd, data.with_name(data.name + "-log"))
    return rss


def parquet_bytes(data: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq
    files = list((data / "flows").rglob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(f.stat().st_size for f in files), rows


FEW = 10_000


def memory_and_storage(active: int, runs: int) -> None:
    packets = active
    many_dir, many_meta = ingest.captures(cache_dir("flows"), packets, active)
    few_dir, few_meta = ingest.captures(ingest.DEFAULT_CACHE, packets, FEW)
    peaks = {"many": [], "few": []}
    stored = None
    with tempfile.TemporaryDirectory(prefix="bench-flows-") as tmp:
        for run in range(runs):
            for kind, directory in (("many", many_dir), ("few", few_dir)):
                data = Path(tmp) / f"{kind}-{run}"
                peaks[kind].append(ingest_peak(directory / "vxlan.pcap", data))
                if kind == "many" and stored is None:
                    stored = parquet_bytes(data)
                shutil.rmtree(data, ignore_errors=True)
                print(f"  run {run + 1}/{runs}: ingest {packets:,} packets, "
                      f"{active if kind == 'many' else FEW:,} flows: peak RSS "
                      f"{peaks[kind][-1]:,.0f} MiB", flush=True)
    many, few = median(peaks["many"]), median(peaks["few"])
    flows = many_meta["expected_flow_rows"]["vxlan"]
    few_flows = few_meta["expected_flow_rows"]["vxlan"]
    per_flow = (many - few) * 2**20 / (flows - few_flows)
    size, rows = stored
    print(f"memory per active flow: ({many:,.0f} - {few:,.0f} MiB) / ({flows:,} - {few_flows:,} "
          f"flows) "
          f"= {per_flow:,.0f} bytes ({'met' if per_flow <= 200 else 'NOT met'}: <= 200)")
    print(f"Parquet per flow row: {size:,} bytes / {rows:,} rows = {size / rows:.1f} bytes "
          f"({'met' if size / rows <= 40 else 'NOT met'}: <= 40)")


def table_memory(active: int) -> None:
    from collector import build
    from collector.flows import FlowConfig
    from collector.flows import fast

    if not fast.available():
        print("flow table: collector._fastflow is not built; skipped")
        return
    inner = build.ethernet(build.ipv4(build.udp(b"x" * 20, sport=1, dport=2, ip_src="10.1.0.1",
                                                ip_dst="10.2.0.1"),
                                      src="10.1.0.1", dst="10.2.0.1", proto=build.UDP))
    template = np.frombuffer(build.vxlan(inner, vni=7159709), np.uint8)
    sport_at = 8 + 14 + 20  # VXLAN, Ethernet, IPv4: the inner UDP ports, then its checksum
    batch_rows = 4096
    buf = np.zeros((batch_rows, 192), np.uint8)
    buf[:, :len(template)] = template
    buf[:, sport_at + 6:sport_at + 8] = 0  # no UDP checksum (IPv4 allows it)
    lengths = np.full(batch_rows, len(template), np.int64)
    table = fast.FastFlowTable(FlowConfig(max_flows=max(active, 1) * 2))
    rss_before = _rss()
    start_ns = 1_764_115_200 * 10**9
    for first in range(0, active, batch_rows):
        n = min(batch_rows, active - first)
        flow = np.arange(first, first + n, dtype=np.uint32)
        buf[:n, sport_at:sport_at + 2] = (flow >> 16).astype(">u2").view(np.uint8).reshape(n, 2)
        buf[:n, sport_at + 2:sport_at + 4] = (flow & 0xFFFF).astype(">u2").view(
            np.uint8).reshape(n, 2)
        ts = start_ns + np.arange(n, dtype=np.int64) * 1000 + first * 1000
        table.add_batch(fast.decode_batch(buf[:n], lengths[:n]), ts)
    grown = _rss() - rss_before
    flows = len(table)
    per_flow = table.memory() / flows
    print(f"flow table at {flows:,} active flows: {table.memory():,} bytes by its own account = "
          f"{per_flow:,.0f} bytes per flow; process RSS grew {grown / flows:,.0f} bytes per flow "
          f"({'met' if max(per_flow, grown / flows) <= 200 else 'NOT met'}: <= 200)")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- 3: queries over generated rows -------------------------------------------------------------


def generate_rows(root: Path, rows: int) -> None:
    import pyarrow as pa

    from collector.store.schema import FLOWS
    from collector.store.writer import DatasetWriter

    rng = np.random.default_rng(SEED)
    start_us = 1_764_115_200 * 10**6  # 2025-11-26 00:00 UTC
    addresses = pa.array([f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(200_000)])
    servers = pa.array([f"172.16.{i >> 8}.{i & 255}" for i in range(2_000)])
    sessions = pa.array([f"tms-0bench{n:011x}" for n in range(4)])
    enis = pa.array([f"eni-0bench{n:011x}" for n in range(4)])
    reasons = pa.array(["idle", "active", "fin", "rst", "evicted", "shutdown"])
    writer = DatasetWriter(root, "flows", collector_id="bench", max_rows=rows + 1,
                           flush_seconds=1e9)
    chunk = 1_000_000
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        session = rng.integers(0, 4, n)
        first_seen = np.sort(start_us + rng.integers(0, 24 * 3600 * 10**6, n))
        packets = np.minimum(rng.zipf(1.6, n), 10**6).astype(np.int64)
        rev_packets = np.minimum(rng.zipf(1.6, n), 10**6).astype(np.int64)
        size = rng.choice(np.array([60, 576, 1450]), n, p=[0.4, 0.3, 0.3])
        truncated = np.where(rng.random(n) < 0.03, packets, 0)
        protocol = rng.choice(np.array([6, 17, 1], np.int16), n, p=[0.7, 0.25, 0.05])
        columns = {
            "vni": pa.array(7159709 + session, pa.int32()),
            "session_id": sessions.take(pa.array(session)),
            "network_interface_id": enis.take(pa.array(session)),
            "collector_id": pa.array(["bench"]).take(pa.array(np.zeros(n, np.int64))),
            "ethertype": pa.array(np.full(n, 2048), pa.int32()),
            "ip_version": pa.array(np.full(n, 4), pa.int8()),
            "protocol": pa.array(protocol, pa.int16()),
            "src_addr": addresses.take(pa.array(rng.zipf(1.3, n) % 200_000)),
            "dst_addr": servers.take(pa.array(rng.integers(0, 2_000, n))),
            "src_port": pa.array(rng.integers(32768, 61000, n), pa.int32()),
            "dst_port": pa.array(rng.choice(np.array([443, 80, 53, 22]), n), pa.int32()),
            "first_seen": pa.array(first_seen, pa.timestamp("us", tz="UTC")),
            "last_seen": pa.array(first_seen + rng.integers(0, 60 * 10**6, n),
                                  pa.timestamp("us", tz="UTC")),
            "packets": pa.array(packets),
            "bytes": pa.array(packets * size),
            "rev_packets": pa.array(rev_packets),
            "rev_bytes": pa.array(rev_packets * size),
            "captured_bytes": pa.array(packets * size),
            "rev_captured_bytes": pa.array(rev_packets * size),
            "truncated_packets": pa.array(truncated),
            "rev_truncated_packets": pa.array(np.zeros(n, np.int64)),
            "tcp_flags": pa.array(np.where(protocol == 6, 27, 0).astype(np.int16)),
            "rev_tcp_flags": pa.array(np.where(protocol == 6, 27, 0).astype(np.int16)),
            "end_reason": reasons.take(pa.array(rng.integers(0, 6, n))),
        }
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in FLOWS]
        writer.write(pa.Table.from_arrays(arrays, schema=FLOWS))
        writer.flush()
    writer.close()


def query_latency(rows: int, runs: int) -> None:
    from collector.query import connect

    root = cache_dir("flows") / f"rows-{rows}-s{SEED}-g{GENERATOR}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        generate_rows(root, rows)
        (root / ".complete").write_text("")
        print(f"generated {rows:,} flow rows in {time.perf_counter() - started:.1f} s")
    files = list((root / "flows").rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    print(f"dataset: {root} ({len(files)} files, {size / 2**20:,.0f} MiB)")
    con = connect(root)
    (count,) = con.execute("SELECT count(*) FROM flows").fetchone()
    print(f"  {count:,} rows in the flows view")
    print(f"{'query':40s} {'first (s)':>10s} {'median warm (s)':>16s} {'cpu s (warm)':>13s}"
          "  target < 1 s")
    for name, sql in QUERIES.items():
        con = connect(root)
        started = time.perf_counter()
        con.execute(sql).fetchall()
        cold = time.perf_counter() - started
        warm, cpu = [], []
        for _ in range(runs):
            started, cpu_started = time.perf_counter(), _cpu()
            con.execute(sql).fetchall()
            warm.append(time.perf_counter() - started)
            cpu.append(_cpu() - cpu_started)
        verdict = "met" if median(warm) < 1 else "NOT met"
        print(f"{name:40s} {cold:10.3f} {median(warm):16.3f} {median(cpu):13.3f}  {verdict}")
    print("(cpu s: this process's user + system seconds over the query, all DuckDB threads: "
          "what the query costs whatever else runs on the machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--active", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=1,
                        help="ingests per capture for the peak RSS (it hardly varies)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    print_header("flows: memory per active flow, Parquet per row, queries over many flows")
    if not args.skip_memory:
        table_memory(args.active)
        memory_and_storage(args.active, args.memory_runs)
    query_latency(args.rows, args.runs)
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
