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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from ray_consensus.errors import SpecError, StorageError
from ray_consensus.spec.config import StorageSpec
from ray_consensus.storage.atomic import atomic_write
from ray_consensus.storage.listing import walk, walk_later

# Dictionary encoding bloats float maps (~19 KB vs 12.5 KB raw for 56x56 float32); zstd shrinks them.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "zstd"}


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
                    max_pool_connections=32,  # the listing's and read-ahead's threads (16 each) share a client
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
        return ("no S3 credentials: set storage.access_key_id/secret_access_key or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
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

    def write_parquet(self, rel: str, table: pa.Table) -> int:
        """Write a table whole; returns the file's size in bytes (what a unit's marker records)."""
        raise NotImplementedError

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        raise NotImplementedError

    def read_small_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """`read_parquet` of a per-shard file, a few MB at most (S3: fetched whole in one request, not in
        pyarrow's ranged reads)."""
        return self.read_parquet(rel, columns)

    def parquet_rows(self, rel: str) -> int:
        """A small Parquet file's row count, from its footer."""
        raise NotImplementedError

    read_threads = 1  # files `read_parquets` / `count_parquet_rows` read at once (S3: many; local: one)

    def read_parquets(self, rels: Iterable[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
        """`read_small_parquet` of each path, in order, reading up to `read_threads` files ahead: a pass over
        every shard's small files (tables, error counts) or over a shard's member units (the reducer)
        waits on many S3 requests at once instead of one after another, and holds at most
        `read_threads` + 1 tables."""
        return read_ahead(lambda rel: self.read_small_parquet(rel, columns), rels, self.read_threads)

    def count_parquet_rows(self, rels: Iterable[str]) -> int:
        """The summed row counts of Parquet files (from their footers; no column is decoded), `read_threads`
        at once."""
        return sum(read_ahead(self.parquet_rows, rels, self.read_threads))

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

    def files(self, prefix: str, sized: tuple[str, ...] = ()) -> list[str]:
        """`list` unsorted; files named one of `sized` as `rel<TAB>size`."""
        raise NotImplementedError

    def files_under(self, prefixes: list[str], name_start: str = "", sized: tuple[str, ...] = ()) -> list[str]:
        """The files under several prefixes whose names start with `name_start`, unsorted, and those named
        one of `sized` as `rel<TAB>size in bytes` (sizes come with the listing: S3 pages carry them, a
        local walk stats those files only). On S3 listed in parallel: it pages one listing 1,000 keys at a
        time, so the many folders of a big run root list in seconds."""

        def keep(rel: str) -> bool:
            name = rel.rpartition("/")[2]
            return name.startswith(name_start) or "\t" in name

        listings = read_ahead(lambda p: self.files(p, sized), prefixes, min(self.listing_threads, len(prefixes)))
        return [rel for listed in listings for rel in listed if keep(rel)]

    def files_under_later(self, prefixes: list[str], name_start: str = "", sized: tuple[str, ...] = ()
                          ) -> Callable[[], list[str]]:
        """`files_under` started now; returns a function that waits for it and gives the files, so the
        caller works while the store lists (S3: threads waiting on the network)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        future = pool.submit(self.files_under, prefixes, name_start, sized)
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


def read_ahead(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """`map(fn, items)` in order, with up to `threads` calls running ahead of the one consumed (one
    thread: a plain map)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early (or an error) leaves nothing queued
            for future in pending:
                future.cancel()


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = str(Path(root).expanduser().absolute())

    def _path(self, rel: str) -> Path:
        return Path(self.root) / safe_rel(rel)

    def _atomic(self, rel: str, write) -> None:
        atomic_write(self._path(rel), write)  # a reader never sees half a file

    def write_parquet(self, rel, table):
        size = []

        def write(tmp: str) -> None:
            pq.write_table(table, tmp, **PARQUET_OPTIONS)
            size.append(os.path.getsize(tmp))

        self._atomic(rel, write)
        return size[0]

    def read_parquet(self, rel, columns=None):
        return pq.read_table(self._path(rel), columns=columns)

    def parquet_rows(self, rel):
        return pq.ParquetFile(self._path(rel)).metadata.num_rows

    def write_bytes(self, rel, data):
        self._atomic(rel, lambda tmp: Path(tmp).write_bytes(data))

    def read_bytes(self, rel):
        return self._path(rel).read_bytes()

    def exists(self, rel):
        return self._path(rel).exists()

    def list(self, prefix=""):
        return sorted(self.files(prefix))

    def files(self, prefix="", sized=()):
        return walk(str(self._path(prefix)), safe_rel(prefix), "", sized)

    def files_under(self, prefixes, name_start="", sized=()):
        return [rel for p in prefixes for rel in walk(str(self._path(p)), safe_rel(p), name_start, sized)]

    # From this many folders on (a committee of 14 members or more), a child process lists them while
    # the caller plans: listing a big local run root costs seconds of kernel time (`listing.py`).
    BACKGROUND_PREFIXES = 16

    def files_under_later(self, prefixes, name_start="", sized=()):
        if len(prefixes) < self.BACKGROUND_PREFIXES:
            files = self.files_under(prefixes, name_start, sized)
            return lambda: files
        return walk_later(self.root, [safe_rel(p) for p in prefixes], name_start, sized)

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
    read_threads = 16

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
        # Encoded in memory, then one upload: S3 objects appear whole or not at all, and the size is known.
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **PARQUET_OPTIONS)
        data = buf.getvalue()
        with self.fs.open_output_stream(f"{self.bucket}/{self._key(rel)}") as out:
            out.write(data)
        return data.size

    def read_parquet(self, rel, columns=None):
        return pq.read_table(f"{self.bucket}/{self._key(rel)}", filesystem=self.fs, columns=columns)

    # pyarrow's S3 reads of a file cost several round trips (its size, the footer, the data); one GET is one
    def read_small_parquet(self, rel, columns=None):
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

    def parquet_rows(self, rel):
        return pq.ParquetFile(pa.BufferReader(self.read_bytes(rel))).metadata.num_rows

    def write_bytes(self, rel, data):
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def read_bytes(self, rel):
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        for attempt in range(3):  # botocore retries the request, not a body cut off after it: ask again
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(self.uri(rel)) from None
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
                if attempt == 2:
                    raise

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

    def files(self, prefix="", sized=()):
        key = self._key(prefix)
        key = key + "/" if key and prefix else key
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key):
            out.extend(f"{obj['Key'][strip:]}\t{obj['Size']}" if obj["Key"].rpartition("/")[2] in sized
                       else obj["Key"][strip:] for obj in page.get("Contents", []))
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


def data_location(uri: str) -> str:
    """A data set's URI as the readers take it: s3:// URIs as they are, `file://` URIs and paths as local
    paths (`file:///abs/path` or `file://localhost/abs/path`, percent-escapes decoded). Raises SpecError
    for any other scheme."""
    from urllib.parse import unquote

    if is_s3(uri):
        return uri
    if uri.startswith("file://"):
        host, _, path = uri[len("file://"):].partition("/")
        if host not in ("", "localhost"):
            raise SpecError(f"{uri}: a file:// URI names a path on this machine (file:///path), not on '{host}'")
        return "/" + unquote(path)
    if "://" in uri:
        raise SpecError(f"unsupported URI scheme in {uri!r}: use a local path, file:///path or s3://bucket/prefix")
    return os.path.expanduser(uri)


class Listed(NamedTuple):
    """A data file and its version: what the file is now, without reading it (`<size>-<mtime_ns>` on a
    local disk, the object's ETag on S3): a file rewritten in place gets another version."""

    uri: str
    version: str


def _etag(obj: dict) -> str:
    """An S3 object's version: its ETag (of a listing entry or a HEAD response), without the quotes."""
    return str(obj.get("ETag", "")).strip('"')


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}"


def list_uri(uri: str, spec: StorageSpec | None = None) -> tuple[list[Listed], list[str]]:
    """Every file under a local folder or s3:// prefix with its version, sorted by URI, and the names of
    the folders directly under it, empty ones included (on S3: the first path segments of the keys, a
    zero-byte `name/` folder object included). The versions come with the listing (one stat per file
    locally, the ETags of the listing pages on S3): no request per object. File names are as the disk
    gives them (a name that is not UTF-8 keeps its surrogate escapes, for the caller to reject)."""
    if is_s3(uri):
        store = S3Store(uri, spec)
        key = store._key("")
        key = key + "/" if key else key
        files, dirs = [], set()
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=key):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key):]
                if "/" in rel:
                    dirs.add(rel.split("/", 1)[0])
                if rel and not rel.endswith("/"):
                    files.append(Listed(store.uri(rel), _etag(obj)))
        return sorted(files), sorted(dirs)
    root = data_location(uri)
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    files, dirs, seen = [], [], set()

    def visit(path: str) -> None:  # symbolic links to folders followed, each folder listed once
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_dir():
                    if path == root:
                        dirs.append(e.name)
                    visit(e.path)
                elif e.is_file():
                    files.append(Listed(e.path, _local_version(e.stat())))

    visit(root)
    return sorted(files), sorted(dirs)


def list_versions(uris: list[str], spec: StorageSpec | None = None) -> dict[str, str]:
    """{uri: version} of the given files (the rows of a manifest table): each folder holding one of them is
    listed once, not recursively (a million images in a thousand folders: a thousand listings, not a
    million requests). Files not found are left out."""
    from concurrent.futures import ThreadPoolExecutor

    def folder(parent: str) -> list[tuple[str, str]]:
        if is_s3(parent):
            bucket, prefix = split_s3(parent)
            prefix = prefix + "/" if prefix else ""
            out = []
            pages = _cached_client(spec).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                                   Delimiter="/")
            for page in pages:
                out += [(f"s3://{bucket}/{o['Key']}", _etag(o))
                        for o in page.get("Contents", [])]
            return out
        try:
            with os.scandir(parent or "/") as entries:  # (a name that is not UTF-8 is in no manifest)
                return [(f"{parent}/{e.name}", _local_version(e.stat())) for e in entries
                        if e.is_file() and is_utf8(e.name)]
        except OSError:
            return []

    parents = sorted({u.rpartition("/")[0] for u in uris})
    with ThreadPoolExecutor(16 if any(is_s3(p) for p in parents) else 1) as pool:
        return {u: v for listed in pool.map(folder, parents) for u, v in listed}


def is_utf8(name: str) -> bool:
    """False for a file name the disk gave with surrogate escapes (bytes that are not UTF-8)."""
    try:
        name.encode()
        return True
    except UnicodeEncodeError:
        return False


_CONTENT: dict = {}


def content_version(uri: str, spec: StorageSpec | None = None) -> str:
    """What a single file (a checkpoint) holds, cheaply: the SHA-256 of a local file (hashed once per path,
    size and mtime in this process), the ETag of an S3 object (one HEAD request: S3 derives it from the
    content); '' when the file cannot be found."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return _etag(_cached_client(spec).head_object(Bucket=bucket, Key=key))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return ""
            raise
    path = data_location(uri)
    try:
        st = os.stat(path)
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo not in _CONTENT:
            import hashlib

            with open(path, "rb") as f:
                _CONTENT[memo] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        return _CONTENT[memo]
    except OSError:
        return ""
