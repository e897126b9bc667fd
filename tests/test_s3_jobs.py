"""S3 run roots over real HTTP, `ray start --head` + `ray job submit`, and incremental reruns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml
from imagesets import make_image_folder, tiny_spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A local `ray start --head` cluster whose processes see the S3 server's AWS variables."""
    env = {**os.environ, **s3_server.env(), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}  # `ray start` and `ray job submit` must agree on token auth (Ray 2.60)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    dash = free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                    "--dashboard-agent-listen-port", str(free_port()),  # not the default another Ray may hold
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "-m", "ray_consensus", *args]
    for _ in range(30):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stderr:  # the head's job agent is still starting
            return proc
        time.sleep(2)
    return proc


@pytest.mark.slow
def test_job_submit_into_s3_then_grow(tmp_path, s3_server, s3_bucket, ray_head):
    address, env = ray_head
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=5)
    upload_folder(client, bucket, data, "data")
    spec = tiny_spec(data, f"{s3_bucket}/runs/nightly")
    spec["dataset"] = {"path": f"{s3_bucket}/data/images", "masks": f"{s3_bucket}/data/masks"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    proc = submit(address, env, "run", str(spec_file), "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from pyarrow import fs

    s3fs = fs.S3FileSystem(endpoint_override=s3_server.endpoint_url.removeprefix("http://"), scheme="http",
                           access_key=s3_server.access_key_id, secret_key=s3_server.secret_access_key,
                           region=s3_server.region)
    models = pq.read_table(f"{bucket}/runs/nightly/tables/models.parquet", filesystem=s3fs).to_pandas()
    assert set(models["model_id"]) == {"a", "b", "consensus"}
    assert pq.read_table(f"{bucket}/runs/nightly/tables/correlations.parquet", filesystem=s3fs).num_rows >= 3
    info = json.loads(client.get_object(Bucket=bucket, Key="runs/nightly/run.json")["Body"].read())
    assert info["status"] == "complete"
    assert info["units_computed"] == {"attributions": 4, "reduce": 2}  # 10 images, shards of 8, 2 models
    attributions = pq.read_table(f"{bucket}/runs/nightly/attributions", filesystem=s3fs).to_pandas()
    assert len(attributions) == 20

    # Unchanged resubmission: no attribution unit computed.
    proc = submit(address, env, "run", str(spec_file), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(client.get_object(Bucket=bucket, Key="runs/nightly/run.json")["Body"].read())
    assert info["units_computed"]["attributions"] == 0 and info["units_skipped"]["attributions"] == 4

    # Nightly growth: 3 new images per class and a third member -> exactly the new units.
    make_image_folder(data, n_classes=2, per_class=3, start=5)
    upload_folder(client, bucket, data, "data")
    spec["committee"].append({"id": "c", "arch": "resnet10t", "weights": "random"})
    spec_file.write_text(yaml.safe_dump(spec))
    proc = submit(address, env, "run", str(spec_file), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(client.get_object(Bucket=bucket, Key="runs/nightly/run.json")["Body"].read())
    # old shards 0, 1 gain member c (2 units); the 6 new images form shard 2 (3 units: a, b, c)
    assert info["units_computed"] == {"attributions": 5, "reduce": 3}
    attributions = pq.read_table(f"{bucket}/runs/nightly/attributions", filesystem=s3fs).to_pandas()
    assert len(attributions) == 16 * 3
    assert not attributions.duplicated(["image_id", "model"]).any()

    # The secret key never lands in the run root.
    secret = s3_server.secret_access_key.encode()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/")
            for o in page.get("Contents", [])]
    assert keys
    for key in keys:
        assert secret not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key
    assert s3_server.secret_access_key not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def checking_s3(monkeypatch_module):
    """A second moto server that checks signatures, with an IAM user whose keys it knows.

    moto accepts any key unless authentication is on; INITIAL_NO_AUTH_ACTION_COUNT lets the
    first requests through (creating the user and its key) and checks every later one. How many
    requests reach it first is not fixed (a readiness probe that timed out on a loaded machine still
    counts), so the count is generous and what is left of it is used up below, until a wrong key is
    refused.
    """
    from botocore.exceptions import ClientError
    from s3server import S3Server

    monkeypatch_module.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "40")
    server = S3Server()
    server.start()
    monkeypatch_module.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    iam = boto3.client(
        "iam", endpoint_url=server.endpoint_url, region_name=server.region, aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap")
    iam.create_user(UserName="runner")
    iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="runner")["AccessKey"]
    server.access_key_id, server.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]
    wrong = boto3.client("s3", endpoint_url=server.endpoint_url, region_name=server.region,
                         aws_access_key_id=server.access_key_id, aws_secret_access_key="wrong")
    for _ in range(60):  # until the server checks signatures
        try:
            wrong.list_buckets()
        except ClientError:
            break
    else:
        pytest.fail("the S3 server never started checking signatures")
    server.make_bucket("checked-bucket")
    server.client().put_object(Bucket="checked-bucket", Key="probe", Body=b"")  # the right keys do work
    with pytest.raises(Exception, match="403|Forbidden|SignatureDoesNotMatch"):
        boto3.client("s3", endpoint_url=server.endpoint_url, region_name=server.region,
                     aws_access_key_id=server.access_key_id, aws_secret_access_key="wrong"
                     ).put_object(Bucket="checked-bucket", Key="probe", Body=b"")
    yield server
    server.stop(keep_state=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("case", ["endpoint", "secret", "bucket"])
def test_bad_s3_settings_fail_before_ray_with_one_line(tmp_path, s3_server, s3_bucket, checking_s3, case):
    from test_cli import cli

    data = make_image_folder(tmp_path / "ds", n_classes=2, per_class=2, masks=False)
    env = {**os.environ, **s3_server.env()}
    output = f"{s3_bucket}/run"
    if case == "endpoint":
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{free_port()}"
        expect = "cannot reach the S3 endpoint"
    elif case == "secret":
        env = {**os.environ, **checking_s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
        output = "s3://checked-bucket/run"
        expect = "denied"
    else:
        output = "s3://no-such-bucket-here/run"
        expect = "bucket 'no-such-bucket-here' does not exist"
    proc = cli("run", "--dataset", str(data / "images"), "--model", "a=resnet10t@random", "--output", output,
               env=env)
    assert proc.returncode == 2, proc.stderr  # not 1: Ray was never imported (test_cli.RUNNER)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert s3_server.secret_access_key not in proc.stderr
