"""Fixtures shared by the whole suite."""

import importlib.util
import shutil
import uuid
from pathlib import Path

import pytest

from s3server import S3Server


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's standalone server over HTTP) for the session.

    A test that calls `s3_server.stop()` must call `s3_server.start()` again (in a
    `finally`), since other tests share the server.
    """
    server = S3Server()
    server.start()
    yield server
    server.stop(keep_state=False)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty, uniquely named bucket on `s3_server`, as `s3://name`."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")


LEGACY = Path(__file__).resolve().parent / "legacy"


@pytest.fixture
def legacy_root(s3_server, tmp_path, monkeypatch):
    """A run root written by 0.1.0 (tests/legacy/run) copied to tmp_path, its data set back in its
    bucket on the test S3 server (the AWS variables point at it): a finished run for any test."""
    module_spec = importlib.util.spec_from_file_location("make_fixture", LEGACY / "make_fixture.py")
    fixture = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(fixture)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    if fixture.BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=fixture.BUCKET)
    for path in sorted((LEGACY / "data").rglob("*.png")):
        client.upload_file(str(path), fixture.BUCKET, f"data/{path.relative_to(LEGACY / 'data').as_posix()}")
    root = tmp_path / "run"
    shutil.copytree(LEGACY / "run", root)
    from ray_consensus.config import parse_spec

    yield root, parse_spec(fixture.spec(str(root)))
    import ray

    ray.shutdown()  # execute() started one for the reducer: leave the next tests a clean process


