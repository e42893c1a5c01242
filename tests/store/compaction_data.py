"""Datasets for the compaction tests: many small files over a few closed hours, written by the
real DatasetWriter as several appliances would, and the queries whose results must not change."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa

from collector.store.schema import FLOWS, PACKETS
from collector.store.writer import DatasetWriter

UTC = dt.timezone.utc
START = dt.datetime(2026, 1, 1, tzinfo=UTC)

# The questions users ask, each with an ORDER BY that makes the answer exact.
QUERIES = {
    "flows": "SELECT * EXCLUDE (date, hour), date, hour FROM flows ORDER BY ALL",
    "top_talkers": ("SELECT src_addr, sum(bytes + rev_bytes) AS b, count(*) AS n FROM flows "
                    "GROUP BY ALL ORDER BY b DESC, src_addr LIMIT 20"),
    "conversations": "SELECT * FROM conversations ORDER BY ALL",
    "per_hour": "SELECT date, hour, count(*), sum(packets) FROM flows GROUP BY ALL ORDER BY ALL",
    "packets": "SELECT count(*), sum(wire_len), min(ts), max(ts) FROM packets",
}


def flow_rows(count: int, hour: int, rng: random.Random, collector: str) -> list[dict]:
    rows = []
    for _ in range(count):
        first = START + dt.timedelta(hours=hour, seconds=rng.randrange(3600))
        client = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 30)}"
        rows.append(dict(
            vni=rng.choice([7159709, 42]), session_id="tms-1", collector_id=collector,
            ip_version=4, protocol=rng.choice([6, 17]),
            src_addr=client, dst_addr=f"10.1.0.{rng.randrange(1, 5)}",
            src_port=rng.randrange(1024, 1100), dst_port=rng.choice([53, 80, 443]),
            first_seen=first, last_seen=first + dt.timedelta(seconds=rng.randrange(60)),
            packets=rng.randrange(1, 50), bytes=rng.randrange(40, 60000),
            rev_packets=rng.randrange(0, 50), rev_bytes=rng.randrange(0, 60000),
            truncated_packets=0, rev_truncated_packets=0, tcp_flags=rng.choice([2, 18, 27]),
            rev_tcp_flags=rng.choice([0, 18]), end_reason=rng.choice(["idle", "active", "fin"])))
    return rows


def packet_rows(count: int, hour: int, rng: random.Random, collector: str) -> list[dict]:
    return [dict(ts=START + dt.timedelta(hours=hour, seconds=rng.randrange(3600)), vni=42,
                 collector_id=collector, ip_version=4, protocol=6, src_addr="10.0.0.1",
                 dst_addr="10.1.0.1", src_port=1, dst_port=2, wire_len=rng.randrange(60, 1500),
                 captured_len=60, truncated=False, tcp_flags=16, frame=b"\x00" * 8)
            for _ in range(count)]


def write_small_files(root, *, hours: int = 3, files_per_hour: int = 6, rows_per_file: int = 40,
                      collectors=("appliance-a", "appliance-b"), seed: int = 1,
                      hour_offset: int = 0) -> int:
    """Many small files per hour from several collector ids; returns the files written."""
    rng = random.Random(seed)
    files = 0
    for collector in collectors:
        flows = DatasetWriter(root, "flows", collector_id=collector, writer_id=str(seed))
        packets = DatasetWriter(root, "packets", collector_id=collector, writer_id=str(seed))
        for hour in range(hour_offset, hour_offset + hours):
            for _ in range(files_per_hour // len(collectors) or 1):
                flows.write(pa.Table.from_pylist(flow_rows(rows_per_file, hour, rng, collector), schema=FLOWS))
                files += len(flows.flush())
                packets.write(pa.Table.from_pylist(packet_rows(rows_per_file, hour, rng, collector),
                                                   schema=PACKETS))
                files += len(packets.flush())
    return files


def results(con) -> dict[str, list]:
    return {name: con.sql(sql).fetchall() for name, sql in QUERIES.items()}


class Templates:
    """Datasets written once per test module and copied for each test (writing many small
    files with fsync is the slow part)."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self._made: dict[tuple, object] = {}

    def copy(self, target, **options) -> None:
        import shutil

        key = tuple(sorted(options.items()))
        if key not in self._made:
            source = self.directory / f"template-{len(self._made)}"
            write_small_files(source, **options)
            self._made[key] = source
        shutil.copytree(self._made[key], target, dirs_exist_ok=True)
