"""A local S3-compatible server for tests: moto's standalone server in its own process.

Tests talk real HTTP to it, exactly as the product talks to AWS or MinIO; nothing is
patched in-process. The server answers every AWS service, but only S3 is used here.
"""

from __future__ import annotations

import atexit
import http.client
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _StoredObject:
    bucket: str
    key: str
    body: bytes
    content_type: str
    metadata: dict[str, str]


@dataclass
class S3Server:
    """moto's standalone server (`python -m moto.server`) on 127.0.0.1, in a subprocess.

    `endpoint_url` is `http://127.0.0.1:<port>`; the keys are fake but distinctive
    (`secret_access_key` is `test-secret-<hex>`), so a test can grep logs, tables and
    run.json for the secret to prove it was never written out.

    State: moto keeps buckets and objects in the memory of its process, so a process that
    is killed loses them. `stop()` therefore first snapshots every bucket and object over
    the S3 API and `start()` puts them back on the same port: a stop/start pair behaves
    like an outage of a real store, whose data survives (objects with their content type
    and user metadata; not versions, tags or unfinished multipart uploads).
    `stop(keep_state=False)` drops them instead. moto's own `/moto-api/` does not cover this: `reset`
    only wipes, and its
    request recorder replays raw requests, which breaks on multipart uploads (new upload
    ids) and can interleave log lines under concurrent writers.
    """

    port: int = 0  # 0: pick a free port on the first start(); restarts reuse it
    access_key_id: str = field(default_factory=lambda: f"test-key-{secrets.token_hex(4)}")
    secret_access_key: str = field(default_factory=lambda: f"test-secret-{secrets.token_hex(8)}")
    region: str = "us-east-1"
    startup_timeout_s: float = 30.0
    host: str = field(default="127.0.0.1", init=False)
    log_path: Path = field(init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _snapshot: tuple[list[str], list[_StoredObject]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # The server logs every request; a file (not a pipe nobody reads) never blocks it.
        self.log_path = Path(tempfile.mkdtemp(prefix="moto-s3-")) / "server.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, the AWS CLI and the product at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config):
        """A boto3 S3 client for this server; `config` goes to `botocore.config.Config`."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region,
                            config=Config(**config))

    def filesystem(self):
        """A `pyarrow.fs.S3FileSystem` for this server (pyarrow ignores AWS_ENDPOINT_URL)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=f"{self.host}:{self.port}", scheme="http",
                               access_key=self.access_key_id, secret_key=self.secret_access_key,
                               region=self.region)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` and return its URI, `s3://name`."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def start(self) -> None:
        """Start the server (on the same port as before, if it ran before) and wait until it answers.

        Restores the snapshot taken by the last `stop()`, if any. Raises RuntimeError with
        the server's output when it exits or does not answer within `startup_timeout_s`.
        """
        if self.running:
            return
        if not self.port:
            self.port = _free_port(self.host)
        elif not _port_is_free(self.host, self.port):
            # Checked up front: another server on the port would answer the readiness probe.
            raise RuntimeError(f"cannot start the moto server: {self.endpoint_url} is in use by another process")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        # A script or test that never calls stop() must not leave the server behind.
        atexit.register(self._terminate)
        self._wait_until_answering()
        if self._snapshot is not None:
            self._restore(*self._snapshot)
            self._snapshot = None

    def stop(self, keep_state: bool = True) -> None:
        """Terminate the server process; with `keep_state`, snapshot buckets and objects first."""
        if not self.running:
            return
        if keep_state:
            self._snapshot = self._take_snapshot()
        self._terminate()

    def _terminate(self) -> None:
        atexit.unregister(self._terminate)
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last `n_chars` of the server's stdout and stderr."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-n_chars:]

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise RuntimeError(f"moto server exited with code {code} while starting on "
                                   f"{self.endpoint_url}; its output:\n{self.log_tail()}")
            # http.client, not urllib: no proxy variables can reroute a request to 127.0.0.1.
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        self.stop(keep_state=False)
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within "
                           f"{self.startup_timeout_s:g} s; its output:\n{self.log_tail()}")

    def _take_snapshot(self) -> tuple[list[str], list[_StoredObject]]:
        s3 = self.client()
        buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
        objects = []
        for bucket in buckets:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for entry in page.get("Contents", []):
                    got = s3.get_object(Bucket=bucket, Key=entry["Key"])
                    objects.append(_StoredObject(bucket, entry["Key"], got["Body"].read(),
                                                 got.get("ContentType", "binary/octet-stream"),
                                                 got.get("Metadata", {})))
        return buckets, objects

    def _restore(self, buckets: list[str], objects: list[_StoredObject]) -> None:
        s3 = self.client()
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        for o in objects:
            s3.put_object(Bucket=o.bucket, Key=o.key, Body=o.body, ContentType=o.content_type,
                          Metadata=o.metadata)


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the server, for what a network does and a local server does
    not: `delay_s` holds each chunk a client sends for that long (every request then costs a round
    trip, as against a bucket across a network); `cut` ends the first response longer than `cut`
    bytes after `cut` of them and closes the connection (a body cut off once its headers arrived;
    `cuts` counts it)."""

    def __init__(self, target_port: int, delay_s: float = 0.0, cut: int | None = None):
        self.target, self.delay_s, self.cut, self.cuts = target_port, delay_s, cut, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if responses and self.cut is not None and not self.cuts and sent + len(data) > self.cut:
                    self.cuts += 1
                    dst.sendall(data[:self.cut - sent])
                    break
                if self.delay_s and not responses:
                    time.sleep(self.delay_s)
                sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # shutdown, not only close: the other direction's thread is in recv() on them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As the server itself does, so a port in TIME_WAIT after stop() counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
