"""`make demo` (`python -m collector.demo`): starts serve, replays two fixtures, prints the top
talkers per session, stops cleanly. Run as a user runs it, in a subprocess, from another
directory; the printed table is exact (one worker, deterministic fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from collector.query import connect

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="collector serve needs Linux (SO_REUSEPORT, /proc)")

TABLE = """\
session_id             src_addr       dst_addr        packets  bytes  truncated_packets
tms-0a42d3e0c1EXAMPLE  10.0.1.10      10.0.3.30            15    847                  0
tms-0a42d3e0c1EXAMPLE  2001:db8:1::a  2001:db8:3::1e        6    360                  0
tms-0a42d3e0c1EXAMPLE  10.0.1.10      10.0.0.2              4    308                  0
tms-0b43e4f1d2EXAMPLE  10.0.1.10      10.0.3.30            14    802                  0
tms-0b43e4f1d2EXAMPLE  2001:db8:1::a  2001:db8:3::1e        6    360                  0
tms-0c44f5a2e3EXAMPLE  10.0.1.10      10.0.3.30             6   2294                  3
tms-0c44f5a2e3EXAMPLE  2001:db8:1::a  2001:db8:3::1e        4   1832                  4
(7 rows)
"""


def run_demo(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "collector.demo", *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


def test_demo_prints_the_top_talkers_per_session_and_exits_0(tmp_path):
    result, seconds = run_demo(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    header = out.index("\nsession_id ") + 1  # the table's header line
    assert out[header:header + len(TABLE)] == TABLE, out
    # two replays: one whole (as captured), one cut by its session's PacketLength
    assert "45 datagrams (VNIs 42 and 43, whole), 9 flows" in out
    assert "10 datagrams (VNI 44), 7 cut to 64 bytes, 6 flows" in out
    assert "55 datagrams received, 0 dropped, 7 truncated copies" in out
    assert out.rstrip().endswith("collector serve exited with 0")
    assert seconds < 20
    assert not list(tmp_path.iterdir())  # nothing left behind in the working directory


def test_demo_keeps_the_dataset_when_asked(tmp_path):
    result, _ = run_demo(tmp_path, "--data", "kept")
    assert result.returncode == 0, result.stdout + result.stderr
    con = connect(tmp_path / "kept")
    rows = con.sql("SELECT vni, count(DISTINCT session_id), sum(packets + rev_packets), "
                   "any_value(end_reason) FROM flows GROUP BY 1 ORDER BY 1").fetchall()
    assert [row[:3] for row in rows] == [(42, 1, 25), (43, 1, 20), (44, 1, 10)]
    assert con.sql("SELECT count(*) FROM sessions").fetchone()[0] >= 3
    assert "collector query --data kept" in result.stdout
