"""Run roots and data on a local folder or any S3-compatible store.

`open_store(uri, spec)` gives a `Store` rooted at the run root. Paths handed to a store are
relative, '/'-separated and may not leave the root. Parquet goes through pyarrow's
filesystems (S3 with the endpoint passed explicitly: pyarrow ignores AWS_ENDPOINT_URL);
object operations (bytes, listing, markers, run.json) go through boto3 on S3.

Credentials come from the spec or the standard AWS variables/profiles; they live only in
memory and are never written anywhere.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from ray_consensus.config import StorageSpec
from ray_consensus.errors import SpecError
from ray_consensus.listing import TEMP_PREFIX, walk, walk_later


# Dictionary encoding bloats float maps (~19 KB vs 12.5 KB raw for 56x56 float32); zstd shrinks them.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "zstd"}


class StorageError(RuntimeError):
    """A storage problem the user must fix (endpoint, keys, bucket); one-line message."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel.lstrip("/") if rel else root


def safe_rel(rel: str) -> str:
    """Check a relative store path: no absolute paths, no '..', no backslashes."""
    norm = posixpath.normpath(rel) if rel else ""
    if rel.startswith("/") or "\\" in rel or norm == ".." or norm.startswith("../") or "/../" in f"/{rel}/":
        raise ValueError(f"path escapes the run root: {rel!r}")
    return "" if norm == "." else norm


# ---------------------------------------------------------------- S3 connection

@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None


def s3_settings(spec: StorageSpec | None) -> S3Settings:
    """Resolve endpoint, region and keys: spec first, then the standard AWS variables and profiles."""
    import boto3

    spec = spec or StorageSpec()
    endpoint = spec.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    session = boto3.Session(profile_name=spec.profile) if spec.profile else boto3.Session()
    region = spec.region or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
    access, secret, token = spec.access_key_id, spec.secret_access_key, None
    if not (access and secret):
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            access, secret, token = frozen.access_key, frozen.secret_key, frozen.token
    return S3Settings(endpoint, region, access, secret, token)


def boto_client(settings: S3Settings, fast: bool = False):
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": 2, "mode": "standard"} if fast else {"max_attempts": 10, "mode": "standard"}
    config = Config(connect_timeout=3 if fast else 10, read_timeout=5 if fast else 60, retries=retries,
                    s3={"addressing_style": "path"} if settings.endpoint_url else None)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
                        aws_session_token=settings.session_token, config=config)


def arrow_s3(settings: S3Settings):
    from pyarrow import fs

    kwargs = dict(region=settings.region, access_key=settings.access_key, secret_key=settings.secret_key,
                  session_token=settings.session_token, connect_timeout=10, request_timeout=60,
                  retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=10))
    if settings.endpoint_url:
        u = urlparse(settings.endpoint_url)
        kwargs.update(endpoint_override=u.netloc + u.path.rstrip("/"), scheme=u.scheme or "https")
    if not settings.access_key:
        kwargs.pop("access_key"), kwargs.pop("secret_key"), kwargs.pop("session_token")
    return fs.S3FileSystem(**kwargs)


def split_s3(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    return u.netloc, u.path.lstrip("/")


def describe_s3_error(e: Exception, bucket: str, endpoint: str | None) -> str:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint or "AWS S3"
    if isinstance(e, NoCredentialsError):
        return "no S3 credentials: set storage.access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if isinstance(e, EndpointConnectionError) or "Connect" in type(e).__name__ or "Timeout" in type(e).__name__:
        return f"cannot reach the S3 endpoint {where} ({type(e).__name__})"
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"bucket '{bucket}' does not exist at {where}"
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return f"access to bucket '{bucket}' at {where} denied ({code}): check the access key and secret key"
        return f"S3 error on bucket '{bucket}' at {where}: {code}"
    return f"S3 error on bucket '{bucket}' at {where}: {type(e).__name__}"


# ---------------------------------------------------------------- stores

class Store:
    """A run root. All paths are relative to it."""

    root: str

    def uri(self, rel: str = "") -> str:
        return join(self.root, safe_rel(rel))

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        raise NotImplementedError

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all files under `prefix` (recursively), sorted."""
        raise NotImplementedError

    def list_dirs(self, prefix: str) -> list[str]:
        """Relative paths of the folders directly under `prefix`, sorted."""
        raise NotImplementedError

    listing_threads = 1  # parallel listings `files_under` runs (S3: many; local: one, it is kernel-bound)

    def files(self, prefix: str) -> list[str]:
        """`list` unsorted."""
        raise NotImplementedError

    def files_under(self, prefixes: list[str], name_start: str = "") -> list[str]:
        """The files under several prefixes whose names start with `name_start`, unsorted (on S3 listed
        in parallel: it pages one listing 1,000 keys at a time, so the many folders of a big run root
        list in seconds)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(self.listing_threads, len(prefixes)))) as pool:
            return [rel for listed in pool.map(self.files, prefixes) for rel in listed
                    if rel.rpartition("/")[2].startswith(name_start)]

    def files_under_later(self, prefixes: list[str], name_start: str = "") -> Callable[[], list[str]]:
        """`files_under` started now; returns a function that waits for it and gives the files, so the
        caller works while the store lists (S3: threads waiting on the network)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        future = pool.submit(self.files_under, prefixes, name_start)
        pool.shutdown(wait=False)
        return future.result

    def delete(self, rel: str) -> None:
        raise NotImplementedError

    def check_writable(self) -> None:
        """Fail fast with StorageError if the root cannot be written; writes nothing lasting."""
        raise NotImplementedError

    # helpers shared by both kinds
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_csv(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        table.to_pandas().to_csv(buf, index=False)
        self.write_bytes(rel, buf.getvalue())


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = str(Path(root).expanduser().absolute())

    def _path(self, rel: str) -> Path:
        return Path(self.root) / safe_rel(rel)

    def _atomic(self, rel: str, write) -> None:
        # Write beside the target, then rename: a reader never sees half a file.
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_parquet(self, rel, table):
        self._atomic(rel, lambda tmp: pq.write_table(table, tmp, **PARQUET_OPTIONS))

    def read_parquet(self, rel, columns=None):
        return pq.read_table(self._path(rel), columns=columns)

    def write_bytes(self, rel, data):
        self._atomic(rel, lambda tmp: Path(tmp).write_bytes(data))

    def read_bytes(self, rel):
        return self._path(rel).read_bytes()

    def exists(self, rel):
        return self._path(rel).exists()

    def list(self, prefix=""):
        return sorted(self.files(prefix))

    def files(self, prefix=""):
        return walk(str(self._path(prefix)), safe_rel(prefix))

    def files_under(self, prefixes, name_start=""):
        return [rel for p in prefixes for rel in walk(str(self._path(p)), safe_rel(p), name_start)]

    # From this many folders on (a committee of 14 members or more), a child process lists them while
    # the caller plans: listing a big local run root costs seconds of kernel time (`listing.py`).
    BACKGROUND_PREFIXES = 16

    def files_under_later(self, prefixes, name_start=""):
        if len(prefixes) < self.BACKGROUND_PREFIXES:
            files = self.files_under(prefixes, name_start)
            return lambda: files
        return walk_later(self.root, [safe_rel(p) for p in prefixes], name_start)

    def list_dirs(self, prefix):
        base = self._path(prefix)
        if not base.is_dir():
            return []
        start = safe_rel(prefix)
        with os.scandir(base) as entries:
            return sorted(f"{start}/{e.name}" if start else e.name for e in entries if e.is_dir())

    def delete(self, rel):
        path = self._path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def check_writable(self):
        p = Path(self.root)
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            raise StorageError(f"run root {self.root} is not writable ({p} is not a writable folder)")


class S3Store(Store):
    listing_threads = 16

    def __init__(self, root: str, spec: StorageSpec | None = None):
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_s3(self.root)
        self.settings = s3_settings(spec)
        self._client = None
        self._fs = None

    def __getstate__(self):  # clients are rebuilt in each process
        return {**self.__dict__, "_client": None, "_fs": None}

    @property
    def client(self):
        if self._client is None:
            self._client = boto_client(self.settings)
        return self._client

    @property
    def fs(self):
        if self._fs is None:
            self._fs = arrow_s3(self.settings)
        return self._fs

    def _key(self, rel: str) -> str:
        rel = safe_rel(rel)
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def write_parquet(self, rel, table):
        # One PUT per file: S3 objects appear whole or not at all.
        pq.write_table(table, f"{self.bucket}/{self._key(rel)}", filesystem=self.fs, **PARQUET_OPTIONS)

    def read_parquet(self, rel, columns=None):
        return pq.read_table(f"{self.bucket}/{self._key(rel)}", filesystem=self.fs, columns=columns)

    def write_bytes(self, rel, data):
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def read_bytes(self, rel):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(self.uri(rel)) from None

    def exists(self, rel):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix=""):
        return sorted(self.files(prefix))

    def files(self, prefix=""):
        key = self._key(prefix)
        key = key + "/" if key and prefix else key
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key):
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return out

    def list_dirs(self, prefix):
        key = self._key(prefix)
        key = key + "/" if key else key
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key,
                                                                          Delimiter="/"):
            out.extend(p["Prefix"][strip:].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(out)

    def delete(self, rel):
        keys = [self._key(r) for r in self.list(rel)] or [self._key(rel)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def check_writable(self):
        client = boto_client(self.settings, fast=True)
        probe = self._key(f".write-probe-{uuid.uuid4().hex}")
        try:
            client.head_bucket(Bucket=self.bucket)
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as e:
            raise StorageError(describe_s3_error(e, self.bucket, self.settings.endpoint_url)) from None


def open_store(uri: str, spec: StorageSpec | None = None) -> Store:
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        if not bucket:
            raise SpecError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
        return S3Store(uri, spec)
    if "://" in uri and not uri.startswith("file://"):
        raise SpecError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))


# ---------------------------------------------------------------- data anywhere

def read_uri_bytes(uri: str, spec: StorageSpec | None = None) -> bytes:
    """Bytes of a data file given by a local path or s3:// URI (images, masks, checkpoints)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = _cached_client(spec)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(uri) from None
    return Path(uri.removeprefix("file://")).expanduser().read_bytes()


_CLIENTS: dict = {}


def _cached_client(spec: StorageSpec | None):
    settings = s3_settings(spec)
    if settings not in _CLIENTS:
        _CLIENTS[settings] = boto_client(settings)
    return _CLIENTS[settings]


def list_uri(uri: str, spec: StorageSpec | None = None) -> list[str]:
    """All file URIs under a local folder or s3:// prefix, sorted."""
    if is_s3(uri):
        store = S3Store(uri, spec)
        return [store.uri(rel) for rel in store.list("")]
    root = Path(uri.removeprefix("file://")).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(str(root))
    return sorted(str(p) for p in root.rglob("*") if p.is_file())
