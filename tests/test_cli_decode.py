"""`collector decode`: exact output for the fixtures, the options, and the error paths."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import build
from collector.cli import main
from collector.decode import Packet

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SEED = str(FIXTURES / "seed-session.pcap")
FULL = str(FIXTURES / "full-session.pcap")
GWLB = str(FIXTURES / "gwlb-session.pcap")
SEED_SESSIONS = str(FIXTURES / "sessions" / "seed.json")

HEADER = ("   NO.  TIME                         ENCAP              VNI  SOURCE                → "
          "DESTINATION            PROTO   FLAGS   WIRE    CAP  T  REASON")
SEED_LINES = [
    HEADER,
    "     1  2026-01-01T00:00:00.000000Z  vxlan          7159709  ?                     → ?     "
    "                 udp     -         66     25  T",
    "     2  2026-01-01T00:00:00.001000Z  vxlan          7159709  ?                     → ?     "
    "                 udp     -         82     25  T",
    "     3  2026-01-01T00:00:00.002000Z  vxlan          7159709  ?                     → ?     "
    "                 udp     -         66     25  T",
    "     4  2026-01-01T00:00:00.003000Z  vxlan          7159709  ?                     → ?     "
    "                 udp     -         94     25  T",
    "     5  2026-01-01T00:00:00.004000Z  vxlan          7159709  ?                     → ?     "
    "                 tcp     -         40     25  T",
]
SEED_SUMMARY = ("18 records, 18 mirror datagrams: 18 decoded, 0 malformed, 18 truncated copies, "
                "0 cut by the capture\n")


def run(*args: str):
    return CliRunner().invoke(main, ["decode", *args])


def test_seed_session_table():
    result = run(SEED)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:6] == SEED_LINES
    assert len(lines) == 1 + 18
    assert lines[-1] == ("    18  2026-01-01T00:00:00.017000Z  vxlan          7159709  ?             "
                         "        → ?                      icmp    -         76     25  T")
    assert result.stderr == SEED_SUMMARY


def test_seed_session_with_its_session_file():
    result = run(SEED, "--sessions", SEED_SESSIONS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == ("   NO.  TIME                         ENCAP              VNI  SESSION      "
                        "          SOURCE                → DESTINATION            PROTO   FLAGS   "
                        "WIRE    CAP  T  REASON")
    assert lines[1] == ("     1  2026-01-01T00:00:00.000000Z  vxlan          7159709  "
                        "tms-08a33b1214EXAMPLE  ?                     → ?                      "
                        "udp     -         66     25  T")
    assert all("tms-08a33b1214EXAMPLE" in line for line in lines[1:])


def test_unknown_vni_shows_a_dash_for_the_session():
    result = run(FULL, "--sessions", SEED_SESSIONS, "--limit", "1")
    assert result.stdout.splitlines()[1] == (
        "     1  2026-01-01T00:00:00.000000Z  vxlan               42  -                      "
        "10.0.1.10:53001       → 10.0.0.2:53            udp     -         66     80")


def test_full_session_lines():
    lines = run(FULL).stdout.splitlines()
    assert len(lines) == 1 + 45
    assert lines[6] == ("     6  2026-01-01T00:00:00.004050Z  vxlan               43  "
                        "10.0.1.10:40000       → 10.0.3.30:80           tcp     S         40     54")
    assert lines[7] == ("     7  2026-01-01T00:00:00.005000Z  vxlan               43  "
                        "10.0.3.30:80          → 10.0.1.10:40000        tcp     SA        40     54")
    assert lines[17] == ("    17  2026-01-01T00:00:00.010000Z  vxlan               43  "
                         "10.0.3.30:80          → 10.0.1.10:40000        tcp     FPA       53     67")
    assert lines[25] == ("    25  2026-01-01T00:00:00.014000Z  vxlan               42  "
                         "10.0.1.10             → 10.0.3.30              icmp    -         76     90")
    assert lines[33] == ("    33  2026-01-01T00:00:00.018000Z  vxlan               42  "
                         "[2001:db8:1::a]:40100 → [2001:db8:3::1e]:443   tcp     S         60     74")


def test_gwlb_session_line():
    lines = run(GWLB, "--limit", "1").stdout.splitlines()
    assert lines[1] == ("     1  2026-01-01T00:00:00.000000Z  geneve-vxlan        42  "
                        "10.0.1.10:53001       → 10.0.0.2:53            udp     -         66     80")


def test_jsonl_has_every_packet_field():
    result = run(FULL, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == 45
    tagged = objects[-1]
    packet_fields = {f.name for f in dataclasses.fields(Packet)}
    record_fields = {"file", "index", "timestamp_ns", "time", "outer_src", "outer_dst",
                     "outer_src_port", "outer_dst_port", "udp_payload_len",
                     "udp_payload_captured", "malformed"}
    assert set(tagged) == packet_fields | record_fields
    assert {k: tagged[k] for k in record_fields} == {
        "file": FULL, "index": 44, "timestamp_ns": 1767225600024000000,
        "time": "2026-01-01T00:00:00.024000Z", "outer_src": "10.0.1.10",
        "outer_dst": "10.0.2.20", "outer_src_port": tagged["outer_src_port"],
        "outer_dst_port": 4789, "udp_payload_len": 71, "udp_payload_captured": 71,
        "malformed": None,
    }
    assert 49152 <= tagged["outer_src_port"] <= 65535
    assert {k: tagged[k] for k in ("vni", "vlans", "src_addr", "dst_addr", "eth_src",
                                   "src_port", "dst_port", "wire_len", "captured_len",
                                   "truncated", "ip_proto", "l3_offset")} == {
        "vni": 42, "vlans": [100], "src_addr": "10.0.1.10", "dst_addr": "10.0.3.30",
        "eth_src": "02:00:0a:00:01:0a", "src_port": 40514, "dst_port": 514, "wire_len": 45,
        "captured_len": 63, "truncated": False, "ip_proto": 17, "l3_offset": 18,
    }
    assert objects[32]["src_addr"] == "2001:db8:1::a"  # IPv6 as text


def test_jsonl_session_id():
    result = run(SEED, "--format", "jsonl", "--sessions", SEED_SESSIONS, "--limit", "1")
    (obj,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert obj["session_id"] == "tms-08a33b1214EXAMPLE"
    assert (obj["vni"], obj["captured_len"], obj["wire_len"], obj["truncated"]) == (
        7159709, 25, 66, True)
    assert obj["src_addr"] is None


def test_limit():
    result = run(SEED, "--limit", "2")
    assert result.stdout.splitlines() == SEED_LINES[:3]
    assert result.stderr == ("2 records, 2 mirror datagrams: 2 decoded, 0 malformed, "
                             "2 truncated copies, 0 cut by the capture\n")


def test_several_captures_name_the_file():
    result = run(SEED, GWLB, "--limit", "20")
    lines = result.stdout.splitlines()
    width = max(len(SEED), len(GWLB))
    assert lines[0] == f"{'FILE':<{width}}  {HEADER}"
    assert lines[1] == f"{SEED:<{width}}  {SEED_LINES[1]}"
    assert lines[19].startswith(f"{GWLB:<{width}}       1  ")
    assert len(lines) == 21


def _pcap(frames) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 1767225600, i, len(frame), len(frame)) + frame
    return out


def _mirror(payload: bytes, port: int = 4789) -> bytes:
    datagram = build.udp(payload, sport=50000, dport=port)
    return build.ethernet(build.ipv4(datagram, src="10.0.1.10", dst="10.0.2.20",
                                     proto=build.UDP, ttl=255))


def test_malformed_datagrams_and_other_traffic(tmp_path):
    frame = build.mirrored_frame(build.FrameSpec()).data
    no_i_flag = build.vxlan(frame, vni=5, flags=0x00)
    path = tmp_path / "mixed.pcap"
    path.write_bytes(_pcap([_mirror(no_i_flag), _mirror(build.vxlan(frame, vni=5)),
                            _mirror(build.vxlan(frame, vni=5), port=8472),
                            _mirror(b"\x40" + bytes(7), port=6081)]))
    result = run(str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        "     1  2026-01-01T00:00:00.000000Z  vxlan                -  -                     → -  "
        "                    -       -          -      -     vxlan_no_vni_flag",
        "     2  2026-01-01T00:00:00.000001Z  vxlan                5  10.0.0.1:40000        → "
        "10.0.0.2:443           tcp     S         40     54",
        "     4  2026-01-01T00:00:00.000003Z  geneve               -  -                     → -  "
        "                    -       -          -      -     geneve_version",
    ]
    assert result.stderr == ("4 records, 3 mirror datagrams: 1 decoded, 2 malformed "
                             "(geneve_version 1, vxlan_no_vni_flag 1), 0 truncated copies, "
                             "0 cut by the capture\n")


def test_not_a_capture_names_the_file_and_offset_0():
    result = run(SEED_SESSIONS)
    assert result.exit_code == 1
    assert result.stderr.endswith(
        f"Error: {SEED_SESSIONS}: not a pcap or pcapng file: magic 0x7b225472 at offset 0\n")
    assert "Traceback" not in result.output
    assert result.stdout == HEADER + "\n"


def test_cut_capture_keeps_the_lines_before_the_error(tmp_path):
    content = Path(SEED).read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(content[:-30])
    result = run(str(path))
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 1 + 17
    offset = len(content) - 16 - 75  # the last record: 16-byte header, 75 bytes of frame
    assert result.stderr == (
        "17 records, 17 mirror datagrams: 17 decoded, 0 malformed, 17 truncated copies, "
        f"0 cut by the capture\nError: {path}: record 18 at offset {offset} is cut: caplen 75, "
        "45 bytes left\n")


def test_missing_capture():
    result = run("no-such-file.pcap")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_bad_sessions_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    result = run(SEED, "--sessions", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {bad}")


@pytest.mark.parametrize("args", [[], ["--format", "csv", SEED], ["--limit", "-1", SEED]])
def test_usage_errors(args):
    assert run(*args).exit_code == 2


def test_help_describes_the_columns():
    result = run("--help")
    assert result.exit_code == 0
    for words in ("CAPTURE...", "--sessions", "--format", "--limit", "tshark", "truncated"):
        assert words in result.stdout


def test_readme_documents_the_command():
    assert "collector decode" in (ROOT / "README.md").read_text()
