"""`collector ingest` and `collector query` as a user runs them."""

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collector.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    result = CliRunner().invoke(main, [
        "ingest", str(FIXTURES / "seed-session.pcap"), str(FIXTURES / "full-session.pcap"),
        "--data", str(data), "--sessions", str(FIXTURES / "sessions" / "seed.json"),
        "--collector-id", "cli-test"])
    assert result.exit_code == 0, result.output
    return data


def query(data, sql, *options):
    return CliRunner().invoke(main, ["query", "--data", str(data), sql, *options])


def test_ingest_reports_what_it_did(tmp_path):
    result = CliRunner().invoke(main, ["ingest", str(FIXTURES / "seed-session.pcap"),
                                       "--data", str(tmp_path), "--collector-id", "x"])
    assert result.exit_code == 0
    assert "18 packets from 1 file(s)" in result.output
    assert "18 mirror datagrams, 0 plain packets, 0 skipped; 18 decoded, 0 malformed, " \
           "18 truncated copies; 3 flows in 1 file(s)" in result.output
    assert len(list(tmp_path.glob("flows/date=2026-01-01/hour=00/x-0-*.parquet"))) == 1
    assert len(list(tmp_path.glob("sessions/**/*.parquet"))) == 0  # no --sessions


def test_query_table_output(dataset):
    result = query(dataset, "SELECT vni, session_id, protocol, packets, truncated_packets FROM flows "
                            "WHERE vni = 7159709 ORDER BY protocol")
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "    vni  session_id             protocol  packets  truncated_packets",
        "7159709  tms-08a33b1214EXAMPLE         1        4                  4",
        "7159709  tms-08a33b1214EXAMPLE         6       10                 10",
        "7159709  tms-08a33b1214EXAMPLE        17        4                  4",
        "(3 rows)",
    ]


def test_query_csv_and_json(dataset):
    sql = "SELECT vni, count(*) AS flows FROM flows GROUP BY vni ORDER BY vni"
    rows = list(csv.reader(io.StringIO(query(dataset, sql, "--format", "csv").output)))
    assert rows == [["vni", "flows"], ["42", "6"], ["43", "3"], ["7159709", "3"]]
    assert json.loads(query(dataset, sql, "--format", "json").output) == [
        {"vni": 42, "flows": 6}, {"vni": 43, "flows": 3}, {"vni": 7159709, "flows": 3}]


def test_query_to_parquet_file(dataset, tmp_path):
    out = tmp_path / "out.parquet"
    result = query(dataset, "SELECT * FROM flows", "--format", "parquet", "--output", str(out))
    assert result.exit_code == 0 and pq.read_metadata(out).num_rows == 12
    assert query(dataset, "SELECT 1", "--format", "parquet").exit_code == 2


def test_sql_error_is_one_line_exit_2(dataset):
    result = query(dataset, "SELECT nope FROM flows")
    assert result.exit_code == 2
    assert result.output.startswith("Error: Binder Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_empty_dataset_is_not_an_error(tmp_path):
    result = query(tmp_path, "SELECT count(*) AS n FROM flows")
    assert result.exit_code == 0 and result.output.splitlines() == ["n", "0", "(1 row)"]


def test_sessions_are_stored_with_the_data(dataset):
    result = query(dataset, "SELECT vni, session_id, packet_length, collector_id FROM sessions", "--format", "csv")
    assert list(csv.reader(io.StringIO(result.output)))[1:] == [["7159709", "tms-08a33b1214EXAMPLE", "25", "cli-test"]]


def test_ingest_of_a_non_capture_names_the_file(tmp_path):
    bogus = tmp_path / "notes.pcap"
    bogus.write_text("hello")
    result = CliRunner().invoke(main, ["ingest", str(bogus), "--data", str(tmp_path / "d")])
    assert result.exit_code == 1 and "notes.pcap" in result.output and "offset 0" in result.output
    assert "Traceback" not in result.output
