"""The S3 requests every caller shares, against the moto server over HTTP: one paginated listing that sees
every key whatever the page size, and one test of "this object is not there" behind every read."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from ray_consensus.storage import s3
from ray_consensus.storage.datafiles import content_version, list_uri, list_versions, read_uri_bytes
from ray_consensus.storage.paths import split_s3
from ray_consensus.storage.s3 import list_pages, s3_client, s3_settings
from ray_consensus.storage.store import S3Store


@pytest.fixture
def bucket(s3_server, s3_bucket, monkeypatch) -> str:
    """A fresh bucket, as `s3://name`, with the AWS variables pointing the product at the server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_bucket


FILES = [f"data/{c}/{i}.jpg" for c in ("cat", "dog", "eel") for i in range(3)] + ["data/top.csv"]
BESIDE = ["data2/x.jpg", "database.csv"]  # share the prefix "data" but are not in the folder data/


@pytest.fixture
def listed(bucket) -> str:
    client = s3_client(s3_settings(None))
    for key in FILES + BESIDE:
        client.put_object(Bucket=split_s3(bucket)[0], Key=key, Body=key.encode())
    return bucket


def test_the_listing_returns_every_key_across_pages_of_any_size(listed):
    name, client = split_s3(listed)[0], s3_client(s3_settings(None))
    for size, n_pages in ((1, 10), (3, 4), (None, 1)):  # 10 keys in data/
        pages = list(list_pages(client, name, "data/", page_size=size))
        assert len(pages) == n_pages
        assert [o["Key"] for page in pages for o in page.objects] == sorted(FILES)

    pages = list(list_pages(client, name, "data/", one_level=True, page_size=2))
    assert len(pages) == 2  # a page holds 2 entries, objects and folders alike
    assert [o["Key"] for page in pages for o in page.objects] == ["data/top.csv"]
    assert [f for page in pages for f in page.folders] == ["data/cat/", "data/dog/", "data/eel/"]


def test_every_lister_sees_its_folder_and_nothing_beside_it(listed):
    name = split_s3(listed)[0]
    store = S3Store(f"{listed}/data")
    assert sorted(store.list()) == [k.removeprefix("data/") for k in sorted(FILES)]
    assert store.list_dirs("") == ["cat", "dog", "eel"]
    assert sorted(store.files("cat", sized=("1.jpg",))) == ["cat/0.jpg", "cat/1.jpg\t14", "cat/2.jpg"]

    files, dirs = list_uri(f"{listed}/data/")
    assert [f.uri for f in files] == [f"s3://{name}/{k}" for k in sorted(FILES)]
    assert dirs == ["cat", "dog", "eel"] and all(f.version for f in files)
    versions = list_versions([f"s3://{name}/data/dog/1.jpg", f"s3://{name}/data/top.csv"])
    assert set(versions) == {f"s3://{name}/data/{k}" for k in ("top.csv", "dog/0.jpg", "dog/1.jpg", "dog/2.jpg")}
    assert versions[f"s3://{name}/data/top.csv"] == content_version(f"s3://{name}/data/top.csv")


def test_a_missing_object_is_missing_and_a_denied_one_an_error_to_every_reader(bucket, monkeypatch):
    """One test of "not there" (`s3.is_missing`) behind `exists`, `read_bytes`, `content_version` and
    `read_uri_bytes`: a missing key is False / FileNotFoundError / '', an access denied (403) is raised
    as the error it is, never taken for a missing file."""
    name = split_s3(bucket)[0]
    client = s3_client(s3_settings(None))
    client.put_object(Bucket=name, Key="denied/x.bin", Body=b"secret")
    client.put_object(Bucket=name, Key="open/x.bin", Body=b"open")
    client.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": f"arn:aws:s3:::{name}/denied/*"}]}))
    asked = []
    is_missing = s3.is_missing
    monkeypatch.setattr(s3, "is_missing", lambda e: asked.append(e) or is_missing(e))
    store = S3Store(bucket)

    assert store.exists("open/x.bin") and store.read_bytes("open/x.bin") == b"open"
    assert content_version(f"{bucket}/open/x.bin") and read_uri_bytes(f"{bucket}/open/x.bin") == b"open"
    assert not asked

    assert store.exists("open/none.bin") is False
    assert content_version(f"{bucket}/open/none.bin") == ""
    with pytest.raises(FileNotFoundError):
        store.read_bytes("open/none.bin")
    with pytest.raises(FileNotFoundError):
        read_uri_bytes(f"{bucket}/open/none.bin")
    assert len(asked) == 4

    for read in (lambda: store.exists("denied/x.bin"), lambda: content_version(f"{bucket}/denied/x.bin"),
                 lambda: store.read_bytes("denied/x.bin"), lambda: read_uri_bytes(f"{bucket}/denied/x.bin")):
        with pytest.raises(ClientError) as denied:
            read()
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(asked) == 8
