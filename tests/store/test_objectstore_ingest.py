"""`collector ingest --data s3://...`: the flows of a capture land in the store as they would in
a directory; with the store unreachable they stay in the spool, and a later run uploads them."""

import subprocess
import sys
from pathlib import Path

from collector.query import connect

CAPTURE = Path(__file__).resolve().parents[2] / "fixtures" / "full-session.pcap"
SQL = ("SELECT vni, src_addr, dst_addr, src_port, dst_port, protocol, packets, bytes, rev_packets, "
       "rev_bytes, first_seen, end_reason FROM flows ORDER BY ALL")


def ingest(data, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "collector", "ingest", str(CAPTURE), "--data", str(data),
                           "--collector-id", "ing", "--vni", "5", *map(str, extra)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_ingest_to_the_store_equals_ingest_to_a_directory(s3_store, tmp_path):
    local = ingest(tmp_path / "local", env=s3_store.process_env())
    assert local.returncode == 0, local.stderr
    remote = ingest(s3_store.url, "--spool", tmp_path / "spool", env=s3_store.process_env())
    assert remote.returncode == 0, remote.stderr
    assert "uploaded to " + s3_store.url in remote.stderr
    assert list((tmp_path / "spool").rglob("*.parquet")) == []
    partitions = lambda keys: sorted(key.rsplit("/", 1)[0] for key in keys)  # noqa: E731
    assert partitions(s3_store.objects()) == partitions(
        p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*.parquet"))
    expected = connect(tmp_path / "local").sql(SQL).fetchall()
    assert expected and connect(s3_store.url).sql(SQL).fetchall() == expected


def test_store_down_keeps_the_files_in_the_spool_for_the_next_run(s3_store, tmp_path):
    down = {**s3_store.process_env(), "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    failed = ingest(s3_store.url, "--spool", tmp_path / "spool", "--upload-timeout", 1, env=down)
    assert failed.returncode == 1 and "stay in" in failed.stderr and "not uploaded" in failed.stderr
    kept = sorted(p.name for p in (tmp_path / "spool").rglob("*.parquet"))
    assert kept and s3_store.objects() == {}
    again = ingest(s3_store.url, "--spool", tmp_path / "spool", env=s3_store.process_env())
    assert again.returncode == 0, again.stderr
    names = sorted(key.rsplit("/", 1)[1] for key in s3_store.objects())
    assert set(kept) < set(names) and len(names) == 2 * len(kept)  # both runs', each once
