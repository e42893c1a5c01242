"""`collector replay`: the summary lines, sessions and filters, dry runs, and the error paths.
Replays go to a UDP socket the test binds on 127.0.0.1."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.capture import read_capture
from collector.cli import main
from collector.decode import decode_datagram
from collector.decode.outer import outer_datagram

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
FULL = str(FIXTURES / "full-session.pcap")
SESSIONS = str(FIXTURES / "sessions" / "describe-sessions.json")
FILTERS = str(FIXTURES / "sessions" / "describe-filters.json")
CURL = ROOT.parent / "shared" / "pcaps" / "mixed" / "arkime_curl-enabled-tls13.pcap"


def run(*args: str):
    return CliRunner().invoke(main, ["replay", *args])


@pytest.fixture
def sink():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    yield sock
    sock.close()


def target(sock) -> str:
    return f"127.0.0.1:{sock.getsockname()[1]}"


def received(sock) -> list[bytes]:
    got = []
    try:
        while True:
            got.append(sock.recv(65535))
    except TimeoutError:
        return got


def test_summary_in_tcpreplay_shape(sink):
    result = run(FULL, "--as-captured", "--target", target(sink), "--topspeed")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"Actual: 45 packets \(5561 bytes\) sent in \d+\.\d\d seconds", lines[0])
    assert re.fullmatch(r"Rated: \d+\.\d Bps, \d+\.\d\d Mbps, \d+\.\d\d pps", lines[1])
    assert lines[2:] == [
        "Flows: 9 flows",
        f"Statistics for network device: {target(sink)}",
        "\tSuccessful packets:        45",
        "\tFailed packets:            0",
        "\tTruncated packets:         0",
        "\tRetried packets (ENOBUFS): 0",
        f"45 datagrams captured to UDP 4789 were sent to {target(sink)}",
    ]
    assert len(received(sink)) == 45
    assert result.stderr == ""  # no progress bar: stderr is no terminal


def test_the_bytes_are_those_on_the_wire():
    # each datagram's UDP payload with Ethernet, IPv4 and UDP headers, as tcpreplay counts
    payloads = [outer_datagram(r.linktype, r.data).payload for r in read_capture(FULL)]
    assert sum(len(p) + 14 + 20 + 8 for p in payloads) == 5561


def test_a_plain_capture_with_a_vni(sink):
    if not CURL.is_file():
        pytest.skip(f"{CURL} is absent")
    result = run(str(CURL), "--target", target(sink), "--vni", "42", "-t", "--packet-length",
                 "100")
    assert result.exit_code == 0, result.output
    assert "\tSuccessful packets:        35" in result.stdout
    longer = sum(len(r.data) > 100 for r in read_capture(CURL))
    assert longer == 11 and "\tTruncated packets:         11" in result.stdout
    assert "Flows: 2 flows" in result.stdout
    got = received(sink)
    assert len(got) == 35 and {decode_datagram(d, 4789).vni for d in got} == {42}


def test_the_session_gives_the_vni_and_packet_length(sink):
    result = run(FULL, "--target", target(sink), "-t", "--sessions", SESSIONS, "--session-id",
                 "tms-08a33b1214EXAMPLE")
    assert result.exit_code == 0, result.output
    assert "\tTruncated packets:         45" in result.stdout
    got = received(sink)
    assert len(got) == 45
    assert all(len(d) == 8 + 25 and decode_datagram(d, 4789).vni == 7159709 for d in got)


def test_packet_length_overrides_the_session_with_a_note(sink):
    result = run(FULL, "--target", target(sink), "-t", "--sessions", SESSIONS, "--session-id",
                 "tms-08a33b1214EXAMPLE", "--packet-length", "64")
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: --packet-length 64 overrides the session's PacketLength (25)\n"
    assert {len(d) for d in received(sink)} == {8 + 64}


def test_geneve(sink):
    result = run(FULL, "--target", target(sink), "-t", "--vni", "7", "--encap", "geneve",
                 "--limit", "3")
    assert result.exit_code == 0, result.output
    got = received(sink)
    assert len(got) == 3
    assert {decode_datagram(d, 6081).encap for d in got} == {"geneve-vxlan"}


def test_loop_and_limit(sink):
    result = run(FULL, "--as-captured", "--target", target(sink), "-t", "-l", "0", "-L", "60")
    assert result.exit_code == 0, result.output
    assert "\tSuccessful packets:        60" in result.stdout
    assert "Stopped: the limit of 60 packets was reached" in result.stdout
    assert len(received(sink)) == 60


DRY_RUN_TABLE = """\
DIRECTION  RULE  ACTION                    PACKETS  DESCRIPTION
ingress     100  reject                          0  skip DNS
ingress     200  accept                          0  HTTPS in
ingress       -  no match                       20  not mirrored
egress      100  accept                          8  all IPv6 out
egress        -  no match                       17  not mirrored
-             -  not the source's traffic        0  not mirrored
8 of 45 packets mirrored by filter tmf-04812ff784EXAMPLE
Dry run: 45 records, 8 datagrams would be sent (2 flows); nothing was sent
"""


def test_dry_run_counts_per_rule_and_sends_nothing(sink):
    result = run(FULL, "--as-captured", "--dry-run", "--filter", FILTERS, "--filter-id",
                 "tmf-04812ff784EXAMPLE", "--source-ip", "10.0.1.10", "--source-ip",
                 "2001:db8:1::a")
    assert result.exit_code == 0, result.output
    assert result.stdout == DRY_RUN_TABLE
    assert received(sink) == []


def test_the_sessions_filter_is_the_default_filter_id():
    result = run(FULL, "--dry-run", "--sessions", SESSIONS, "--session-id",
                 "tms-08a33b1214EXAMPLE", "--as-captured", "--filter", FILTERS,
                 "--source-cidr", "10.0.3.0/24")
    assert result.exit_code == 0, result.output
    assert "packets mirrored by filter tmf-04812ff784EXAMPLE" in result.stdout


def test_a_filter_without_rules_mirrors_nothing():
    result = run(FULL, "--as-captured", "--dry-run", "--filter", FILTERS, "--filter-id",
                 "tmf-0293f26e86EXAMPLE", "--source-ip", "10.0.1.10")
    assert result.exit_code == 0, result.output
    assert "0 of 45 packets mirrored by filter tmf-0293f26e86EXAMPLE" in result.stdout


def test_a_real_replay_with_a_filter_sends_only_what_it_mirrors(sink):
    result = run(FULL, "--as-captured", "--target", target(sink), "-t", "--filter", FILTERS,
                 "--filter-id", "tmf-04812ff784EXAMPLE", "--source-ip", "2001:db8:1::a")
    assert result.exit_code == 0, result.output
    assert "\tSuccessful packets:        8" in result.stdout
    assert "37 packets not sent: the filter does not mirror them" in result.stdout
    assert len(received(sink)) == 8


@pytest.mark.parametrize("args, message", [
    ((FULL, "--vni", "1"), "--target HOST:PORT is required"),
    ((FULL, "--target", "127.0.0.1:9"), "a VNI is needed"),
    ((FULL, "--target", "127.0.0.1:9", "--vni", "1", "--loop", "0"),
     "loop 0 (forever) needs a limit or a duration"),
    ((FULL, "--target", "127.0.0.1:9", "--vni", "1", "--packet-length", "9000"),
     "packet length 9000 outside 1-8500"),
    ((FULL, "--target", "127.0.0.1:9", "--vni", "1", "--pps", "5", "--topspeed"),
     "choose one pace, not pps and topspeed"),
    ((FULL, "--target", "127.0.0.1", "--vni", "1"), "expected HOST:PORT"),
    ((FULL, "--target", "127.0.0.1:9", "--vni", "1", "--session-id", "tms-x"),
     "give --vni or --session-id, not both"),
    ((FULL, "--target", "127.0.0.1:9", "--sessions", SESSIONS, "--session-id", "tms-x"),
     "no session tms-x in the --sessions files"),
    ((FULL, "--target", "127.0.0.1:9", "--sessions", SESSIONS), "--sessions needs --session-id"),
    ((FULL, "--vni", "1", "--dry-run", "--filter", FILTERS), "--filter needs the mirrored ENI"),
    ((FULL, "--vni", "1", "--dry-run", "--source-ip", "10.0.0.1"), "need --filter"),
    ((FULL, "--vni", "1", "--dry-run", "--filter", FILTERS, "--source-ip", "10.0.1.10"),
     "holds 2 filters"),
    ((FULL, "--vni", "1", "--dry-run", "--filter", FILTERS, "--filter-id",
      "tmf-0293f26e86EXAMPLE", "--source-ip", "ten"), "source IP 'ten' is not"),
])
def test_errors(args, message):
    result = run(*args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_a_cut_capture_fails_with_file_and_offset(tmp_path, sink):
    cut = tmp_path / "cut.pcap"
    data = Path(FULL).read_bytes()
    cut.write_bytes(data[:-10])
    result = run(str(cut), "--as-captured", "--target", target(sink), "-t")
    assert result.exit_code == 1
    assert re.fullmatch(rf"Error: {re.escape(str(cut))}: record 45 at offset \d+ is cut: "
                        r"caplen \d+, \d+ bytes left \(44 packets were sent before it, "
                        r"0 failed\)\n", result.stderr)
    assert len(received(sink)) == 44  # what came before the fault was sent


def test_a_file_that_is_no_capture(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a capture at all")
    result = run(str(junk), "--vni", "1", "--dry-run")
    assert result.exit_code == 1
    assert "junk.pcap: not a pcap or pcapng file: magic 0x6e6f7420 at offset 0" in result.stderr


def test_help_and_readme():
    result = CliRunner().invoke(main, ["replay", "--help"])
    assert result.exit_code == 0
    assert "Replay captures to a mirroring target" in result.stdout
    for option in ("--target", "--vni", "--session-id", "--encap", "--packet-length",
                   "--multiplier", "--pps", "--mbps", "--topspeed", "--loop", "--limit",
                   "--duration", "--as-captured", "--filter", "--source-ip", "--source-cidr",
                   "--dry-run"):
        assert option in result.stdout
