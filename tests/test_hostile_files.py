"""Hostile capture and sessions files: each is refused with an error naming the file and the
byte offset (or JSON path) of the fault, after the records before it, and with bounded
memory: a length field that says 4 GB must not make the reader buffer 4 GB. Peak memory is
measured in a fresh interpreter (its VmHWM after the read minus before it)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest

from collector import build
from collector.capture import CaptureError, read_capture
from collector.sessions import SessionRegistry, SessionsError

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
FRAME = build.mirrored_frame(build.FrameSpec()).data


def pcap_record(data: bytes, caplen: int | None = None, wire: int | None = None) -> bytes:
    caplen = len(data) if caplen is None else caplen
    return struct.pack("<IIII", 1_700_000_000, 0, caplen, len(data) if wire is None else wire) + data


def block(block_type: int, body: bytes, length: int | None = None, trailer: int | None = None) -> bytes:
    body += b"\0" * (-len(body) % 4)
    real = 12 + len(body)
    return (struct.pack("<II", block_type, real if length is None else length) + body
            + struct.pack("<I", real if trailer is None else trailer))


SHB = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
IDB = block(1, struct.pack("<HHI", 1, 0, 0))


def epb(data: bytes, caplen: int | None = None) -> bytes:
    caplen = len(data) if caplen is None else caplen
    return block(6, struct.pack("<IIIII", 0, 0, 0, caplen, len(data)) + data)


GOOD_PCAP = PCAP_HEADER + pcap_record(FRAME)
GOOD_PCAPNG = SHB + IDB + epb(FRAME)

# name -> (file bytes, records before the error, offset of the error, words in the message)
HOSTILE_CAPTURES = {
    "pcap caplen 4 GB": (GOOD_PCAP + pcap_record(b"", caplen=0xFFFFFFFF) + FRAME, 1, len(GOOD_PCAP),
                         "caplen 4294967295"),
    "pcap caplen 4 GB, first record": (PCAP_HEADER + pcap_record(b"", caplen=0xFFFFFFFF), 0, 24,
                                       "caplen 4294967295"),
    "pcap cut mid-record": (GOOD_PCAP + pcap_record(FRAME)[:30], 1, len(GOOD_PCAP), "is cut"),
    "pcap cut mid-header": (GOOD_PCAP + pcap_record(FRAME)[:9], 1, len(GOOD_PCAP), "is cut"),
    "pcap header cut": (PCAP_HEADER[:20], 0, 0, "header at offset 0 is cut"),
    "wrong magic": (b"\x7fELF" + bytes(60), 0, 0, "not a pcap or pcapng file: magic 0x7f454c46"),
    "empty file": (b"", 0, 0, "no bytes"),
    "pcapng caplen 4 GB": (GOOD_PCAPNG + epb(FRAME, caplen=0xFFFFFFFF), 1, len(GOOD_PCAPNG),
                           "caplen 4294967295"),
    "pcapng block length 4 GB": (GOOD_PCAPNG + block(6, bytes(40), length=0xFFFFFFFC), 1,
                                 len(GOOD_PCAPNG), "length 4294967292"),
    "pcapng unknown block 4 GB long": (GOOD_PCAPNG + block(0x0BAD, bytes(64), length=0xFFFFFFFC), 1,
                                       len(GOOD_PCAPNG), "is cut"),
    "pcapng unknown block, trailer lies": (GOOD_PCAPNG + block(0x0BAD, bytes(64), trailer=8), 1,
                                           len(GOOD_PCAPNG), "trailing length 8"),
    "pcapng interface block 4 GB long": (SHB + block(1, bytes(16), length=0xFFFFFFFC), 0, len(SHB),
                                         "length 4294967292"),
    "pcapng section header 4 GB long": (block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1),
                                              length=0xFFFFFFFC), 0, 0, "length 4294967292"),
    "pcapng length not a multiple of 4": (GOOD_PCAPNG + block(0x0BAD, bytes(8), length=23), 1,
                                          len(GOOD_PCAPNG), "not a multiple of 4"),
    "pcapng packet for an undeclared interface": (SHB + block(6, struct.pack("<IIIII", 7, 0, 0, 4, 4) + b"abcd"),
                                                  0, len(SHB), "interface 7"),
    "pcapng cut mid-block": (GOOD_PCAPNG + epb(FRAME)[:40], 1, len(GOOD_PCAPNG), "is cut"),
    "pcapng bad byte-order magic": (block(0x0A0D0D0A, struct.pack("<IHHq", 0xDEADBEEF, 1, 0, -1)), 0, 0,
                                    "byte-order magic"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CAPTURES))
def test_hostile_capture_is_refused_at_its_offset(tmp_path, name):
    content, before, offset, words = HOSTILE_CAPTURES[name]
    path = tmp_path / "hostile.pcap"
    path.write_bytes(content)
    records = []
    with pytest.raises(CaptureError) as info:
        for record in read_capture(path):
            records.append(record)
    assert len(records) == before and all(r.data == FRAME for r in records)
    assert info.value.offset == offset, str(info.value)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message, message
    if offset:
        assert str(offset) in message, message


def peak_rss_growth_kib(code: str, tmp_path) -> tuple[int, str]:
    """Run `code` (which may use `path`) in a fresh interpreter after its imports; return
    how much its peak RSS grew during `code`, and what it printed."""
    script = textwrap.dedent(f"""
        import sys
        from collector.capture import read_capture, CaptureError
        from collector.sessions import SessionRegistry, SessionsError
        def peak_kib():
            # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        path = sys.argv[1]
        before = peak_kib()
        try:
        {textwrap.indent(textwrap.dedent(code), "    ")}
        except (CaptureError, SessionsError) as err:
            print(type(err).__name__, str(err)[:300])
        print(peak_kib() - before)
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "input")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *said, growth = proc.stdout.strip().splitlines()
    return int(growth), "\n".join(said)


@pytest.mark.parametrize("name", ["pcap caplen 4 GB", "pcapng caplen 4 GB", "pcapng block length 4 GB",
                                  "pcapng unknown block 4 GB long", "pcapng section header 4 GB long"])
def test_absurd_lengths_take_no_memory(tmp_path, name):
    (tmp_path / "input").write_bytes(HOSTILE_CAPTURES[name][0])
    growth, said = peak_rss_growth_kib("for record in read_capture(path): pass", tmp_path)
    assert said.startswith("CaptureError"), said
    assert growth < 8 * 1024, f"peak RSS grew {growth} KiB"


def test_a_real_100_mb_unknown_block_is_streamed_past(tmp_path):
    """An unknown block as long as it says (100 MB on disk) is skipped in 1 MiB chunks."""
    size = 100 << 20
    with open(tmp_path / "input", "wb") as f:
        f.write(SHB + IDB + struct.pack("<II", 0x0BAD, 12 + size))
        f.truncate(len(SHB + IDB) + 8 + size)
        f.seek(0, 2)
        f.write(struct.pack("<I", 12 + size) + epb(FRAME))
    growth, said = peak_rss_growth_kib(
        "print('records', sum(1 for _ in read_capture(path)))", tmp_path)
    assert said == "records 1"
    assert growth < 8 * 1024, f"peak RSS grew {growth} KiB"


# -- sessions files ---------------------------------------------------------------------------


def test_sessions_file_over_the_limit_costs_the_limit_at_most(tmp_path):
    """A sessions file of 200 MB: refused after reading 64 MiB + 1 byte, never parsed."""
    with open(tmp_path / "input", "wb") as f:
        f.write(b"[" + b" " * (200 << 20) + b"]")
    growth, said = peak_rss_growth_kib("SessionRegistry.load(path)", tmp_path)
    assert said.endswith("input: larger than the 64 MiB limit for a sessions file"), said
    assert growth < 80 * 1024, f"peak RSS grew {growth} KiB"


def test_sessions_file_at_the_limit_of_deep_nesting(tmp_path):
    (tmp_path / "input").write_bytes(b"[" * 1_000_000 + b"]" * 1_000_000)
    growth, said = peak_rss_growth_kib("SessionRegistry.load(path)", tmp_path)
    assert said.endswith("input: invalid JSON: nested too deeply"), said
    assert growth < 64 * 1024, f"peak RSS grew {growth} KiB"


def test_sessions_file_of_many_sessions_near_the_limit(tmp_path):
    """About 50 MB of sessions (150,000): loaded, in memory proportional to the file."""
    session = {"TrafficMirrorSessionId": "tms-0", "TrafficMirrorTargetId": "tmt-0123456789abcdef0",
               "TrafficMirrorFilterId": "tmf-0123456789abcdef0", "NetworkInterfaceId": "eni-0123456789abcdef0",
               "OwnerId": "111122223333", "PacketLength": 100, "SessionNumber": 1,
               "VirtualNetworkId": 0, "Description": "x" * 100, "Tags": []}
    sessions = []
    for vni in range(150_000):
        sessions.append(dict(session, TrafficMirrorSessionId=f"tms-{vni:017x}", VirtualNetworkId=vni))
    data = json.dumps({"TrafficMirrorSessions": sessions}).encode()
    assert 40 << 20 < len(data) < 64 << 20
    (tmp_path / "input").write_bytes(data)
    growth, said = peak_rss_growth_kib("print('sessions', len(SessionRegistry.load(path)))", tmp_path)
    assert said == "sessions 150000", said
    print(f"peak RSS growth for {len(data) / 2**20:.0f} MiB of sessions: {growth / 1024:.0f} MiB")
    assert growth < 12 * len(data) // 1024, f"peak RSS grew {growth} KiB"


SESSION = {"TrafficMirrorSessionId": "tms-1", "TrafficMirrorTargetId": "tmt-1",
           "TrafficMirrorFilterId": "tmf-1", "NetworkInterfaceId": "eni-1", "OwnerId": "1",
           "SessionNumber": 1, "VirtualNetworkId": 42}


@pytest.mark.parametrize("doc, words", [
    ({"TrafficMirrorSessions": [dict(SESSION, VirtualNetworkId="7")]},
     "TrafficMirrorSessions[0].VirtualNetworkId: expected an integer"),
    ({"TrafficMirrorSessions": [dict(SESSION, VirtualNetworkId=2**24)]},
     "TrafficMirrorSessions[0].VirtualNetworkId"),
    ({"TrafficMirrorSessions": [dict(SESSION, PacketLength=[1])]}, "TrafficMirrorSessions[0].PacketLength"),
    ({"TrafficMirrorSessions": [dict(SESSION, Tags="x")]}, "TrafficMirrorSessions[0].Tags"),
    ({"TrafficMirrorSessions": {"a": 1}}, "TrafficMirrorSessions"),
    ({"TrafficMirrorSessions": [None, 1, "x", []]}, "TrafficMirrorSessions[0]"),
])
def test_sessions_of_the_wrong_types_name_the_path(tmp_path, doc, words):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load(path)
    assert str(info.value).startswith(f"{path}"), str(info.value)
    assert words in str(info.value)


def test_duplicate_vnis_across_files_load_nothing(tmp_path):
    """Two sessions claiming one VNI: refused, naming both, and no registry (no partial state)."""
    for name, session_id in (("a", "tms-a"), ("b", "tms-b")):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"TrafficMirrorSessions": [dict(SESSION, TrafficMirrorSessionId=session_id)]}))
    with pytest.raises(SessionsError, match="VirtualNetworkId 42 is used by two different sessions: "
                                            "tms-a .*a.json.* and tms-b .*b.json"):
        SessionRegistry.load([tmp_path / "a.json", tmp_path / "b.json"])
