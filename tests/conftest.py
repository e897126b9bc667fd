"""Fixtures shared by the whole suite."""

import uuid

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
