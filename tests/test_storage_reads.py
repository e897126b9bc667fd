"""Reading many small Parquet files: in order, a bounded number ahead, on a local folder and on S3."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from s3server import Proxy

from ray_consensus.storage.store import LocalStore, S3Store, read_ahead


def test_read_ahead_keeps_order_and_at_most_threads_calls_ahead_of_the_consumer():
    started, lock = [], threading.Lock()

    def slow(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (i % 3))  # later items often finish first
        return i * i

    out = []
    for value in read_ahead(slow, range(40), threads=4):
        with lock:
            ahead = len(started) - len(out) - 1  # calls started beyond the one just consumed
        assert ahead <= 4
        out.append(value)
    assert out == [i * i for i in range(40)]
    assert list(read_ahead(slow, range(5), threads=1)) == [0, 1, 4, 9, 16]


def test_read_ahead_raises_the_first_error_in_order_and_stops():
    def fails_at_3(i: int) -> int:
        if i == 3:
            raise FileNotFoundError(f"shard {i}")
        return i

    got = []
    with pytest.raises(FileNotFoundError, match="shard 3"):
        for value in read_ahead(fails_at_3, range(100), threads=8):
            got.append(value)
    assert got == [0, 1, 2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(str(tmp_path / "root"))
    server = request.getfixturevalue("s3_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return S3Store(f"{request.getfixturevalue('s3_bucket')}/root")


def test_read_parquets_and_row_counts_match_reading_each_file(store):
    files = {f"kind/shard={i:05d}/part-0.parquet": pa.table({"x": list(range(i % 4)), "s": [str(i)] * (i % 4)})
             for i in range(20)}
    for rel, table in files.items():
        store.write_parquet(rel, table)
    store.read_threads = 6
    read = list(store.read_parquets(files, columns=["x"]))
    assert [t.column("x").to_pylist() for t in read] == [t.column("x").to_pylist() for t in files.values()]
    assert all(t.column_names == ["x"] for t in read)
    assert store.count_parquet_rows(files) == sum(t.num_rows for t in files.values()) == 30
    with pytest.raises(FileNotFoundError):
        store.count_parquet_rows(list(files) + ["kind/shard=99999/part-0.parquet"])


def test_an_s3_read_whose_body_is_cut_off_is_asked_again(s3_server, s3_bucket, monkeypatch):
    """botocore retries a failed request, not a body that stops after the headers arrived; the store asks
    again (a reduce task would otherwise fail on one dropped connection)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    data = bytes(range(256)) * 2048  # 512 KiB
    S3Store(f"{s3_bucket}/root").write_bytes("unit/part-0.bin", data)
    proxy = Proxy(s3_server.port, cut=100_000)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    assert S3Store(f"{s3_bucket}/root").read_bytes("unit/part-0.bin") == data
    assert proxy.cuts == 1  # the first answer was cut short, and the store read the second one whole
