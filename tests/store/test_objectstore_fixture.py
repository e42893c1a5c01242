"""The S3 test store itself (tests/objectstore.py): objects round trip, survive a restart."""

import pyarrow as pa
import pyarrow.parquet as pq


def test_store_round_trip_and_listing(s3_store):
    fs = s3_store.filesystem()
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, f"{s3_store.bucket}/{s3_store.prefix}/flows/x.parquet", filesystem=fs)
    objects = s3_store.objects()
    assert list(objects) == ["flows/x.parquet"] and objects["flows/x.parquet"] > 0
    read = pq.read_table(f"{s3_store.bucket}/{s3_store.prefix}/flows/x.parquet", filesystem=fs)
    assert read.equals(table)


def test_private_server_keeps_objects_across_restart(s3_server_factory):
    server = s3_server_factory()
    server.create_bucket("restart")
    with server.filesystem().open_output_stream("restart/k") as out:
        out.write(b"payload")
    endpoint = server.endpoint
    server.stop()
    assert not server.running
    server.start()
    assert server.endpoint == endpoint
    assert server.read("restart", "k") == b"payload"
    assert server.objects("restart") == {"k": 7}
