"""The S3 endpoint goes away mid-run and comes back: transient errors are retried, the run completes."""

from __future__ import annotations

import json
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
from imagesets import make_image_folder, tiny_spec

from ray_consensus.spec.config import parse_spec

pytestmark = pytest.mark.slow  # a run on S3 through an outage


class Outage:
    """A TCP proxy in front of the S3 server that can drop off the network and come back.

    While down, its port refuses connections and open connections are cut, as when a store's
    load balancer or the network fails; the store behind it keeps its data.
    """

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self):
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_run_survives_an_s3_outage(tmp_path, s3_server, s3_bucket, monkeypatch, fresh_ray):
    from ray_consensus.runner import execute

    outage = Outage(s3_server.port)
    endpoint = f"http://127.0.0.1:{outage.port}"
    for k, v in {**s3_server.env(), "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(k, v)
    data = make_image_folder(tmp_path / "ds", n_classes=3, per_class=8, masks=False)
    spec = parse_spec(tiny_spec(data, f"{s3_bucket}/run", run={"shard_size": 4},
                                explainer={"name": "smoothgrad", "params": {"n_samples": 16}}))
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()

    def done_units() -> int:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="run/attributions/")
        return sum(1 for p in pages for o in p.get("Contents", []) if "/_done-" in o["Key"])

    try:
        with fresh_ray(runtime_env={"env_vars": {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}}):
            result, failure = {}, []

            def run():
                try:
                    result.update(execute(spec, progress=False).to_dict())
                except BaseException as e:  # surfaced below
                    failure.append(e)

            runner = threading.Thread(target=run)
            runner.start()
            while done_units() < 2 and runner.is_alive():
                time.sleep(0.2)
            assert runner.is_alive(), failure or "the run finished before the outage"
            outage.down()
            time.sleep(4)
            outage.up()
            runner.join(timeout=600)
            assert not failure, failure
            assert result["status"] == "complete"
    finally:
        outage.down()
    assert done_units() == 12
    info = json.loads(client.get_object(Bucket=bucket, Key="run/run.json")["Body"].read())
    assert info["status"] == "complete"
    attrs = pq.read_table(f"{bucket}/run/attributions", filesystem=s3_server.filesystem()).to_pandas()
    assert len(attrs) == 48 and not attrs.duplicated(["image_id", "model"]).any()
