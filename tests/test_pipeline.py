"""The pipeline's flush-interval duties: interim export (opt-in) beside the journal."""

from __future__ import annotations

import pyarrow.parquet as pq

from collector.pipeline import Pipeline
from tests.store.test_journal import S, T0, datagrams


def rows(root) -> list[tuple]:
    files = sorted(root.glob("flows/date=*/hour=*/*.parquet"))
    found = [r for path in files for r in pq.read_table(path).to_pylist()]
    return sorted((r["src_port"], r["packets"], r["end_reason"]) for r in found)


def test_interim_export_writes_each_open_flows_counts_every_flush_interval(tmp_path):
    p = Pipeline(tmp_path, collector_id="c1", flush_seconds=10, interim_export=True)
    p.feed(*datagrams(flows=2, packets=3))
    p.tick(T0, wall=0.0)
    p.tick(T0, wall=5.0)
    assert rows(tmp_path) == []  # not yet a flush interval
    p.tick(T0, wall=10.0)
    assert rows(tmp_path) == [(40000, 3, "active"), (40001, 3, "active")]  # on disk at once
    p.feed(*datagrams(flows=1, packets=2, start_ns=T0 + S))
    p.tick(T0 + S, wall=20.0)
    p.close()
    assert rows(tmp_path) == [(40000, 2, "active"), (40000, 3, "active"), (40001, 3, "active")]


def test_without_interim_export_a_flow_is_one_row(tmp_path):
    p = Pipeline(tmp_path, collector_id="c1", flush_seconds=10, journal=True)
    p.feed(*datagrams(flows=1, packets=3))
    for wall in (0.0, 10.0, 20.0):
        p.tick(T0, wall=wall)
    p.feed(*datagrams(flows=1, packets=2, start_ns=T0 + S))
    p.close()
    assert rows(tmp_path) == [(40000, 5, "shutdown")]
