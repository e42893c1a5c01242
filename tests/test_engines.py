"""The dataset is readable beyond DuckDB: pyarrow.dataset and Spark, reading the plain Hive
layout (no collector code), return the rows `collector query` returns, before compaction, in
the middle of it (committed, not yet published) and after it.

The Spark test runs when COLLECTOR_SPARK_TESTS=1 (`scripts/test-spark` installs pyspark, the
`spark` extra, and runs it): pyspark is a 300 MB download and a local session takes tens of
seconds to start, too much for every `make test`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.query import connect
from collector.store.compact import Settings, compact
from collector.store.schema import FLOWS, PACKETS

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CAPTURES = ("full-session.pcap", "gwlb-session.pcap", "seed-session.pcap")
FAR_FUTURE = 4102444800.0  # 2100: every hour of the fixtures is closed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The fixtures ingested by two collector ids, with the packets table: many small files."""
    root = tmp_path_factory.mktemp("engines") / "data"
    runner = CliRunner()
    for index, capture in enumerate(CAPTURES):
        result = runner.invoke(main, ["ingest", str(FIXTURES / capture), "--data", str(root),
                                      "--packets", "--collector-id", f"appliance-{index % 2}",
                                      "--sessions", str(FIXTURES / "sessions" / "seed.json")])
        assert result.exit_code == 0, result.output
    return root


def stages(dataset, tmp_path):
    """(name, root) of the dataset as written, committed-not-published, and compacted."""
    written = tmp_path / "written"
    shutil.copytree(dataset, written)
    committed = tmp_path / "committed"
    shutil.copytree(dataset, committed)
    compact(committed, settings=Settings(grace=3600), now=FAR_FUTURE)  # published an hour later
    compacted = tmp_path / "compacted"
    shutil.copytree(dataset, compacted)
    compact(compacted, settings=Settings(grace=0), now=FAR_FUTURE)
    assert list(committed.glob("flows/date=*/hour=*/_compact~*.parquet"))
    assert list(compacted.glob("flows/date=*/hour=*/compact~*.parquet"))
    return [("written", written), ("committed", committed), ("compacted", compacted)]


def canonical(table: pa.Table, schema: pa.Schema) -> list[tuple]:
    """Rows as comparable tuples: the schema's columns, then date (text) and hour (int)."""
    columns = [table[name].to_pylist() for name in schema.names]
    dates = [str(d) for d in table["date"].to_pylist()]
    hours = [int(h) for h in table["hour"].to_pylist()]
    return sorted(zip(*columns, dates, hours), key=repr)


def collector_rows(root, table, schema):
    return canonical(connect(root).sql(f"SELECT * FROM {table}").to_arrow_table(), schema)


@pytest.mark.parametrize("table,schema", [("flows", FLOWS), ("packets", PACKETS)])
def test_pyarrow_dataset_with_hive_partitioning_reads_what_collector_reads(dataset, tmp_path,
                                                                         table, schema):
    for stage, root in stages(dataset, tmp_path):
        expected = collector_rows(root, table, schema)
        assert len(expected) > 10
        # no collector code: the plain layout, files starting with '_' or '.' ignored (the
        # pyarrow default, as in Hive, Spark and Athena)
        read = ds.dataset(root / table, format="parquet", partitioning="hive").to_table()
        assert canonical(read, schema) == expected, stage


SPARK_QUERY = ("SELECT vni, src_addr, dst_addr, src_port, dst_port, protocol, date, hour, "
               "count(*) AS n, sum(packets) AS packets, sum(bytes) AS bytes, "
               "sum(rev_bytes) AS rev_bytes, min(unix_micros(first_seen)) AS first_us, "
               "max(unix_micros(last_seen)) AS last_us FROM flows GROUP BY ALL")


def spark_available() -> str | None:
    """Why Spark cannot run here, or None."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install pyspark)"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java runtime (Spark needs Java 17)"
    return None


@pytest.mark.skipif(not os.environ.get("COLLECTOR_SPARK_TESTS"),
                    reason="Spark: set COLLECTOR_SPARK_TESTS=1 (scripts/test-spark installs "
                           "pyspark and runs it; a JVM start is too slow for every run)")
def test_spark_reads_the_prefix_with_partition_discovery(dataset, tmp_path):
    reason = spark_available()
    if reason:
        pytest.fail(reason)  # asked for, so it must run
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").appName("collector-engines")
             .config("spark.sql.session.timeZone", "UTC").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    try:
        for stage, root in stages(dataset, tmp_path):
            expected = connect(root).sql(
                SPARK_QUERY.replace("unix_micros(first_seen)", "epoch_us(first_seen)")
                .replace("unix_micros(last_seen)", "epoch_us(last_seen)")
                .replace("GROUP BY ALL", "GROUP BY ALL ORDER BY ALL")).fetchall()
            frame = (spark.read.option("basePath", str(root / "flows"))
                     .parquet(str(root / "flows")))
            frame.createOrReplaceTempView("flows")
            rows = spark.sql(SPARK_QUERY.replace("GROUP BY ALL", "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8")
                             ).collect()
            got = sorted((tuple(str(v) if k == "date" else v for k, v in row.asDict().items())
                          for row in rows), key=repr)
            want = sorted((tuple(str(v) if i == 6 else v for i, v in enumerate(r)) for r in expected),
                          key=repr)
            assert got == want, stage
            assert dict(frame.dtypes)["hour"] == "int" and len(got) > 5
        # Spark's SQL parser knows Hive DDL: every `collector athena-ddl` statement parses
        from collector.athena import athena_ddl

        parser = spark._jsparkSession.sessionState().sqlParser()
        for statement in athena_ddl("s3://bucket-x/prefix").split(";"):
            if "CREATE EXTERNAL" in statement:
                plan = parser.parsePlan(statement[statement.index("CREATE EXTERNAL"):]).toString()
                assert "CreateTable" in plan or "CreateTableStatement" in plan, plan
    finally:
        spark.stop()
