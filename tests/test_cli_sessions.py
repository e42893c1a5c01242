"""Tests for `collector sessions`: exact output for the fixtures, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sessions"
SEED = str(FIXTURES / "seed.json")
ALL = [str(p) for p in sorted(FIXTURES.glob("*.json"))]

SEED_TABLE = (
    "    VNI  SESSION                ENI                    TARGET                 TARGET TYPE  "
    "FILTER                 NUMBER  PACKET LENGTH  DESCRIPTION\n"
    "7159709  tms-08a33b1214EXAMPLE  eni-070203f901EXAMPLE  tmt-07f75d8feeEXAMPLE  -            "
    "tmf-04812ff784EXAMPLE       1             25  example session\n"
)

ALL_TABLE = "\n".join(
    [
        "    VNI  SESSION                ENI                    TARGET                 "
        "TARGET TYPE                     FILTER                 NUMBER  PACKET LENGTH  "
        "DESCRIPTION",
        "    100  tms-0b7d2c9e5fEXAMPLE  eni-0a5fc9b6e1EXAMPLE  tmt-0dabb38c4aEXAMPLE  "
        "gateway-load-balancer-endpoint  tmf-0293f26e86EXAMPLE       2           full  "
        "web tier, whole packets",
        "    200  tms-0f1e2d3c4bEXAMPLE  eni-0c1d2e3f40EXAMPLE  tmt-01c6a9f0e3EXAMPLE  "
        "network-load-balancer           tmf-04812ff784EXAMPLE       1           8500  "
        "db tier via NLB",
        "7159709  tms-08a33b1214EXAMPLE  eni-070203f901EXAMPLE  tmt-07f75d8feeEXAMPLE  "
        "network-interface               tmf-04812ff784EXAMPLE       1             25  "
        "example session",
        "",
    ]
)


def run(*args: str):
    return CliRunner().invoke(main, ["sessions", *args])


def test_seed_table():
    result = run("--sessions", SEED)
    assert result.exit_code == 0, result.output
    assert result.stdout == SEED_TABLE


def test_table_is_the_default_format():
    assert run("--sessions", SEED, "--format", "table").stdout == run("--sessions", SEED).stdout


def test_seed_json():
    result = run("--sessions", SEED, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {
            "vni": 7159709,
            "session_id": "tms-08a33b1214EXAMPLE",
            "network_interface_id": "eni-070203f901EXAMPLE",
            "target_id": "tmt-07f75d8feeEXAMPLE",
            "target_type": None,
            "target_resource": None,
            "filter_id": "tmf-04812ff784EXAMPLE",
            "session_number": 1,
            "packet_length": 25,
            "description": "example session",
            "owner_id": "111122223333",
            "tags": {},
            "filter": None,
            "source": SEED,
        }
    ]
    assert result.stdout.startswith('[\n  {\n    "vni": 7159709,\n')
    assert result.stdout.endswith("\n  }\n]\n")


def test_all_fixtures_merged_and_enriched():
    result = run("--sessions", *ALL)
    assert result.exit_code == 0, result.output
    assert result.stdout == ALL_TABLE


def test_files_after_one_option_or_each_after_its_own():
    one = run("--sessions", *ALL).stdout
    each = run(*[arg for path in ALL for arg in ("--sessions", path)]).stdout
    bare = run(*ALL).stdout
    assert one == each == bare == ALL_TABLE


def test_json_of_all_fixtures_is_sorted_and_enriched():
    result = run("--format", "json", "--sessions", *ALL)
    sessions = json.loads(result.stdout)
    assert [(s["vni"], s["target_type"]) for s in sessions] == [
        (100, "gateway-load-balancer-endpoint"),
        (200, "network-load-balancer"),
        (7159709, "network-interface"),
    ]
    assert [rule["rule_number"] for rule in sessions[2]["filter"]["ingress"]] == [100, 200]


def test_empty_registry_prints_the_header_only(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text('{"TrafficMirrorSessions": []}')
    assert run("--sessions", str(path)).stdout == (
        "VNI  SESSION  ENI  TARGET  TARGET TYPE  FILTER  NUMBER  PACKET LENGTH  DESCRIPTION\n"
    )
    assert run("--sessions", str(path), "--format", "json").stdout == "[]\n"


def test_no_files_is_a_usage_error():
    result = run()
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.endswith("Error: no files given: pass at least one with --sessions FILE\n")


def test_bad_format_is_a_usage_error():
    result = run("--sessions", SEED, "--format", "csv")
    assert result.exit_code == 2
    assert "'csv' is not one of 'table', 'json'" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"TrafficMirrorSessions": [{"VirtualNetworkId": 1}]}',
            "TrafficMirrorSessions[0].TrafficMirrorSessionId: required field missing",
        ),
        ('{"TrafficMirrorSessions": [', "invalid JSON at line 1, column 28: Expecting value"),
    ],
)
def test_sessions_error_is_a_one_line_error_without_traceback(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run("--sessions", SEED, str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: {path}: {message}\n"
    assert "Traceback" not in result.output


def test_duplicate_vni_across_files(tmp_path):
    other = json.loads(Path(SEED).read_text())
    other["TrafficMirrorSession"]["TrafficMirrorSessionId"] = "tms-other"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    result = run("--sessions", SEED, "--sessions", str(path))
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: VirtualNetworkId 7159709 is used by two different sessions: "
        f"tms-08a33b1214EXAMPLE ({SEED}: TrafficMirrorSession) "
        f"and tms-other ({path}: TrafficMirrorSession)\n"
    )


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.json"
    result = run("--sessions", str(missing))
    assert result.exit_code == 1
    assert result.stderr == f"Error: {missing}: cannot read: No such file or directory\n"


def test_help_documents_the_command():
    result = CliRunner().invoke(main, ["sessions", "--help"])
    assert result.exit_code == 0
    assert "--sessions FILE" in result.stdout
    assert "--format [table|json]" in result.stdout
    assert "collector sessions --sessions sessions.json targets.json filters.json" in result.stdout
    assert "sessions" in CliRunner().invoke(main, ["--help"]).stdout
