"""collector athena-ddl: the exact statements, every schema column with an Athena type, and DDL
that an Athena/Hive parser (sqlglot) accepts with the same columns and properties."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest
import sqlglot
from click.testing import CliRunner
from sqlglot import exp

from collector.athena import athena_ddl, athena_type
from collector.cli import main
from collector.store.schema import TABLES

GOLDEN_PACKETS = """\
CREATE EXTERNAL TABLE IF NOT EXISTS `mirror`.`vpc_packets` (
  `ts` timestamp,
  `vni` int,
  `session_id` string,
  `collector_id` string,
  `ip_version` tinyint,
  `protocol` smallint,
  `src_addr` string,
  `dst_addr` string,
  `src_port` int,
  `dst_port` int,
  `wire_len` int,
  `captured_len` int,
  `truncated` boolean,
  `tcp_flags` smallint,
  `frame` binary COMMENT 'the first --packet-bytes of the mirrored frame'
)
PARTITIONED BY (`date` string, `hour` int)
STORED AS PARQUET
LOCATION 's3://mirror-bucket/appliances/packets/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.date.type' = 'date',
  'projection.date.format' = 'yyyy-MM-dd',
  'projection.date.range' = '2026-01-01,NOW',
  'projection.date.interval' = '1',
  'projection.date.interval.unit' = 'DAYS',
  'projection.hour.type' = 'integer',
  'projection.hour.range' = '0,23',
  'projection.hour.digits' = '2',
  'storage.location.template' = 's3://mirror-bucket/appliances/packets/date=${date}/hour=${hour}/',
  'parquet.compression' = 'ZSTD',
  'collector.schema_version' = '1'
);
"""

ATHENA_TYPE = re.compile(r"^(tinyint|smallint|int|bigint|boolean|float|double|string|binary|date|"
                         r"timestamp|decimal\(\d+,\d+\)|array<.+>|map<.+>|struct<.+>)$")


def run(*args):
    result = CliRunner().invoke(main, ["athena-ddl", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_packets_statement_is_exactly_this():
    text = run("--location", "s3://mirror-bucket/appliances/", "--database", "mirror",
               "--table-prefix", "vpc_")
    assert GOLDEN_PACKETS in text
    assert text.startswith("-- Athena / Glue tables for the collector dataset at "
                           "s3://mirror-bucket/appliances\n")
    assert text.count("CREATE EXTERNAL TABLE") == 3


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_schema_column_appears_with_an_athena_type(table):
    text = athena_ddl("s3://bkt/p")
    statement = text[text.index(f"`collector`.`{table}`"):]
    statement = statement[:statement.index(";")]
    columns = dict(re.findall(r"^  `(\w+)` (\S+?)(?: COMMENT .*)?,?$", statement, re.M))
    assert list(columns) == TABLES[table].names
    for name, type_ in columns.items():
        assert ATHENA_TYPE.match(type_), (name, type_)
    assert columns.get("first_seen", "timestamp") == "timestamp"


def test_types_map_from_pyarrow():
    assert athena_type(pa.map_(pa.string(), pa.string())) == "map<string,string>"
    assert athena_type(pa.list_(pa.int16())) == "array<smallint>"
    assert athena_type(pa.timestamp("us", tz="UTC")) == "timestamp"
    with pytest.raises(ValueError, match="no Athena type"):
        athena_type(pa.duration("s"))


def test_an_athena_parser_accepts_the_statements_with_the_same_columns():
    statements = [s for s in sqlglot.parse(athena_ddl("s3://mirror-bucket/x", database="db"),
                                           read="athena") if s is not None]
    assert [s.this.this.name for s in statements] == ["flows", "packets", "sessions"]
    for statement, (table, schema) in zip(statements, TABLES.items()):
        assert isinstance(statement, exp.Create) and statement.kind == "TABLE"
        names = [c.name for c in statement.this.expressions]
        assert names == schema.names
        properties = statement.args["properties"].sql("hive")  # Athena DDL is Hive's
        assert properties.startswith("PARTITIONED BY (`date` STRING, `hour` INT) STORED AS PARQUET "
                                     f"LOCATION 's3://mirror-bucket/x/{table}/' TBLPROPERTIES (")
        assert "'projection.hour.digits'='2'" in properties
        assert (f"'storage.location.template'='s3://mirror-bucket/x/{table}/date=${{date}}/"
                "hour=${hour}/'") in properties


@pytest.mark.parametrize("args,message", [
    (["--location", "/local/dir"], "expected s3://bucket/prefix"),
    (["--database", "bad-name"], "letters, digits"),
    (["--start-date", "2026/01/01"], "YYYY-MM-DD")])
def test_bad_options_are_refused_by_name(args, message):
    result = CliRunner().invoke(main, ["athena-ddl", *args])
    assert result.exit_code != 0 and message in result.output


def test_s3a_locations_become_s3_for_athena():
    assert "LOCATION 's3://bucket/p/flows/'" in athena_ddl("s3a://bucket/p")
