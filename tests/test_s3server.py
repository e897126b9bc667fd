"""The local S3 test server speaks real S3 over HTTP to boto3 and pyarrow, and survives restarts."""

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3server import S3Server


def test_boto3_put_then_get_returns_the_same_bytes(s3_server, s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    s3 = s3_server.client()
    body = bytes(range(256)) * 3
    s3.put_object(Bucket=bucket, Key="a/b/blob.bin", Body=body)

    assert s3.get_object(Bucket=bucket, Key="a/b/blob.bin")["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("a/b/blob.bin", 768)]


def test_parquet_written_by_pyarrow_is_stored_on_the_server(s3_server, s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    table = pa.table({"image_id": ["x", "y"], "attribution": [[0.5, 0.25], [1.0, -2.0]]})
    pq.write_table(table, f"{bucket}/run/scores/shard=00000/part.parquet", filesystem=s3_server.filesystem())

    # Read back through a second client (boto3) to prove the bytes live on the server.
    raw = s3_server.client().get_object(Bucket=bucket, Key="run/scores/shard=00000/part.parquet")["Body"].read()
    assert raw[:4] == b"PAR1" and raw[-4:] == b"PAR1"
    read = pq.read_table(f"{bucket}/run/scores", filesystem=s3_server.filesystem())
    assert read.column("image_id").to_pylist() == ["x", "y"]
    assert read.column("attribution").to_pylist() == [[0.5, 0.25], [1.0, -2.0]]


def test_env_alone_points_boto3_at_the_server(s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert s3_server.secret_access_key.startswith("test-secret-")

    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert s3_bucket.removeprefix("s3://") in names


def test_stop_then_start_keeps_port_and_objects_and_stop_without_state_wipes():
    server = S3Server()  # its own process: stopping the shared one would disturb other tests
    server.start()
    try:
        endpoint = server.endpoint_url
        server.make_bucket("kept")
        server.client().put_object(Bucket="kept", Key="k", Body=b"v", Metadata={"shard": "7"})

        server.stop()
        fast = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            server.client(**fast).list_buckets()

        server.start()
        assert server.endpoint_url == endpoint
        got = server.client().get_object(Bucket="kept", Key="k")
        assert (got["Body"].read(), got["Metadata"]) == (b"v", {"shard": "7"})

        server.stop(keep_state=False)
        server.start()
        assert server.client().list_buckets()["Buckets"] == []
    finally:
        server.stop(keep_state=False)


def test_a_port_in_use_is_refused_with_a_clear_error(s3_server):
    clash = S3Server(port=s3_server.port)
    with pytest.raises(RuntimeError, match=f"{s3_server.endpoint_url} is in use"):
        clash.start()
    assert not clash.running


def test_a_server_that_does_not_answer_in_time_is_stopped_and_reported():
    slow = S3Server(startup_timeout_s=0.01)  # moto needs far longer than 10 ms to import
    with pytest.raises(RuntimeError, match="did not answer on http://127.0.0.1:[0-9]+ within"):
        slow.start()
    assert not slow.running
