"""`collector.testing`: the pytest plugin an installed collector provides (entry point
`pytest11`), and its library part, `CollectorServer`.

The README example runs in a pytest subprocess (pytester) exactly as a user runs it: no
conftest, the plugin found through the entry point. The other tests use the fixtures
themselves, which this suite has because the project is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collector import build
from collector.testing import CollectorServer, CollectorServerError, Metrics

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="collector serve needs Linux (SO_REUSEPORT, /proc)")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SEED_SESSIONS = FIXTURES / "sessions" / "seed.json"

# README.md, "Testing with collector": keep the two identical.
README_EXAMPLE = '''\
def test_my_capture(collector_server):
    collector_server.replay("fixtures/plain-mixed.pcap", vni=42, packet_length=64)
    rows = collector_server.query("SELECT protocol, sum(packets + rev_packets) FROM flows GROUP BY 1")
    assert dict(rows) == {6: 3, 17: 5, 58: 2}
'''


# -- the plugin as a user meets it ---------------------------------------------------------------


def test_the_readme_shows_this_very_example():
    readme = (FIXTURES.parent / "README.md").read_text()
    assert "```python\n" + README_EXAMPLE + "```" in readme


def test_the_entry_point_names_the_plugin(pytestconfig):
    (entry,) = importlib.metadata.entry_points(group="pytest11", name="collector")
    assert entry.value == "collector.testing"
    if not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        assert pytestconfig.pluginmanager.get_plugin("collector").__name__ == "collector.testing"


def test_the_readme_example_passes_as_written(pytester):
    """Beside it, a user's failing test fails as usual (and its server still stops cleanly),
    and the factory takes settings."""
    (pytester.path / "fixtures").mkdir()
    shutil.copy(FIXTURES / "plain-mixed.pcap", pytester.path / "fixtures")
    pytester.makepyfile(test_readme=README_EXAMPLE, test_user='''
        def test_wrong(collector_server):
            assert collector_server.query("SELECT count(*) FROM flows") == [(1,)]

        def test_factory(collector_server_factory):
            server = collector_server_factory(workers=2, idle_timeout=5)
            assert server.workers == 2 and "--idle-timeout" in server.argv
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", timeout=120)
    result.assert_outcomes(passed=2, failed=1, errors=0)
    result.stdout.fnmatch_lines(["test_readme.py::test_my_capture PASSED*",
                                 "test_user.py::test_wrong FAILED*",
                                 "test_user.py::test_factory PASSED*",
                                 "E * assert [[](0,)[]] == [[](1,)[]]"])


def test_fixtures_are_listed_with_their_docs(pytester):
    listed = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    listed.stdout.fnmatch_lines(["collector_server_factory*", "*Start `CollectorServer`s*",
                                 "collector_server*", "*A started `CollectorServer`*"])


def test_the_library_part_imports_neither_pytest_nor_heavy_modules():
    code = ("import sys; sys.modules['pytest'] = None\n"
            "from collector.testing import CollectorServer\n"
            "heavy = ('pytest', 'duckdb', 'pyarrow', 'numpy', 'collector.replay')\n"
            "print([m for m in heavy if sys.modules.get(m) is not None])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- CollectorServer ----------------------------------------------------------------------------


def test_a_started_server_replays_and_queries(collector_server):
    server = collector_server
    hosts = {server.vxlan[0], server.geneve[0], server.health[0]}
    assert hosts == {"127.0.0.1"}
    assert len({server.vxlan[1], server.geneve[1]}) == 2
    assert server.running() and server.workers == 1
    assert server.data_dir == server.workdir / "data"
    argv = server.argv
    assert argv[:4] == [sys.executable, "-m", "collector", "serve"]
    assert "--control" in argv and argv[argv.index("--flush-seconds") + 1] == "1"
    metrics = server.metrics()
    assert isinstance(metrics, Metrics)
    assert metrics["collector_workers_up"] == 1
    assert metrics['collector_datagrams_received_total{listener="vxlan"}'] == 0
    assert metrics.value("collector_healthy") == 1

    summary = server.replay(FIXTURES / "full-session.pcap", as_captured=True)
    assert (summary.packets, summary.failed) == (45, 0)
    assert server.sent == 45
    # the flows are still active in the worker: nothing on disk yet
    assert server.query("SELECT count(*) FROM flows", flush=False) == [(0,)]
    rows = server.query("SELECT vni, sum(packets + rev_packets), sum(bytes + rev_bytes) "
                        "FROM flows GROUP BY 1 ORDER BY 1")
    assert rows == [(42, 25, 1515), (43, 20, 1162)]
    reasons = dict(server.query("SELECT end_reason, count(*) FROM flows GROUP BY 1",
                                flush=False))
    assert set(reasons) <= {"flush", "fin", "rst"} and reasons["flush"] > 0
    metrics = server.metrics()
    assert metrics.value("collector_datagrams_received_total", listener="vxlan") == 45
    assert metrics.value("collector_kernel_drops_total") == 0

    # datagrams sent with `send` are waited for too
    frame = build.mirrored_frame(build.FrameSpec(ip_version=4, proto=build.UDP, src="10.9.0.1",
                                                 dst="10.9.0.2", sport=5000, dport=53)).data
    assert server.send([build.vxlan(frame, vni=77)] * 5) == 5
    assert server.query("SELECT packets FROM flows WHERE vni = ?", [77]) == [(5,)]


def test_replay_picks_the_listener(collector_server):
    server = collector_server
    server.replay(FIXTURES / "gwlb-session.pcap", as_captured=True)  # UDP 6081 datagrams
    server.replay(FIXTURES / "plain-mixed.pcap", vni=500, encap="geneve")
    server.replay(FIXTURES / "plain-mixed.pcap", vni=501, packet_length=25)
    by_listener = server.flush().by_label("collector_datagrams_received_total", "listener")
    assert by_listener == {"geneve": 28.0, "vxlan": 10.0}
    rows = server.query("SELECT vni, sum(packets + rev_packets), "
                        "sum(truncated_packets + rev_truncated_packets) "
                        "FROM flows GROUP BY 1 ORDER BY 1")
    assert rows == [(42, 18, 0), (500, 10, 0), (501, 10, 10)]


def test_factory_settings_and_sessions(collector_server_factory, tmp_path):
    server = collector_server_factory(workers=2, sessions=[SEED_SESSIONS], idle_timeout=5,
                                      packets=True)
    assert server.argv[server.argv.index("--idle-timeout") + 1] == "5"
    assert "--packets" in server.argv
    server.replay(FIXTURES / "seed-session.pcap", as_captured=True)
    assert server.flush().value("collector_workers_up") == 2
    rows = server.query("SELECT session_id, sum(packets + rev_packets) FROM flows GROUP BY 1")
    assert rows == [("tms-08a33b1214EXAMPLE", 18)]
    assert server.query("SELECT count(*) FROM packets") == [(18,)]


def test_kernel_drops_make_flush_raise(collector_server_factory):
    server = collector_server_factory(rcvbuf="4K")  # a few datagrams' worth of buffer
    frame = build.mirrored_frame(build.FrameSpec(ip_version=4, proto=build.TCP, src="10.9.0.1",
                                                 dst="10.9.0.2", sport=5000, dport=80,
                                                 payload=bytes(1200))).data
    server.send([build.vxlan(frame, vni=78)] * 2000)
    with pytest.raises(CollectorServerError, match="the kernel dropped"):
        server.flush(timeout=5)


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"TrafficMirrorSessions": [{"VirtualNetworkId": "12"}]}))
    server = CollectorServer(tmp_path / "work", sessions=[bad])
    with pytest.raises(CollectorServerError) as caught:
        server.start()
    message = str(caught.value)
    assert "exited with 2" in message and "bad.json" in message
    assert not server.running()


def test_stop_reports_a_failed_exit(tmp_path):
    server = CollectorServer(tmp_path / "work").start()
    server.replay(FIXTURES / "seed-session.pcap", as_captured=True)
    server.flush()
    shutil.rmtree(server.data_dir)  # the pending rows cannot be written at the stop ...
    server.data_dir.write_text("not a directory")
    server.replay(FIXTURES / "seed-session.pcap", as_captured=True)
    with pytest.raises(CollectorServerError, match="exited with 1"):
        server.stop()
    assert server.returncode == 1


def test_context_manager_stops_and_queries_see_the_shutdown_rows_after(tmp_path):
    with CollectorServer(tmp_path / "work") as server:
        server.replay(FIXTURES / "seed-session.pcap", as_captured=True)
        pid = server.pid
    assert server.returncode == 0 and not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.stop() == 0  # again: the same answer
    rows = server.query("SELECT end_reason, sum(packets + rev_packets) FROM flows GROUP BY 1")
    assert rows == [("shutdown", 18)]
    assert (tmp_path / "work" / "data").is_dir()  # a work directory given is kept


def test_a_temporary_work_directory_is_removed():
    server = CollectorServer()
    assert server.workdir.is_dir() and server.data_dir.parent == server.workdir
    server.cleanup()
    assert not server.workdir.exists()
