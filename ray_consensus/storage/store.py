"""The run root: a `Store` on a local folder (`LocalStore`) or under an S3 prefix (`S3Store`).

`open_store(uri, spec)` gives the store rooted at a run root. Paths handed to a store are relative,
'/'-separated and may not leave the root (`paths.safe_rel`). Parquet goes through pyarrow's filesystems;
object operations (bytes, listing, markers, run.json) go through boto3 on S3 (`s3`). Data files outside
the run root (images, masks, checkpoints) are read by `datafiles`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ray_consensus.errors import SpecError, StorageError
from ray_consensus.spec.config import StorageSpec
from ray_consensus.storage.atomic import atomic_write
from ray_consensus.storage.listing import walk, walk_later
from ray_consensus.storage.paths import folder_key, is_s3, join, safe_rel, split_s3
from ray_consensus.storage.s3 import arrow_s3, describe_s3_error, get_bytes, head, list_pages, s3_client, s3_settings

# Dictionary encoding bloats float maps (~19 KB vs 12.5 KB raw for 56x56 float32); zstd shrinks them.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "zstd"}


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
    """A run root under an S3 prefix: objects through one boto3 client per store and process (`s3.s3_client`),
    Parquet through pyarrow's S3 filesystem."""

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
            self._client = s3_client(self.settings)
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
        return get_bytes(self.client, self.bucket, self._key(rel))

    def exists(self, rel):
        return head(self.client, self.bucket, self._key(rel)) is not None

    def list(self, prefix=""):
        return sorted(self.files(prefix))

    def files(self, prefix="", sized=()):
        strip = len(folder_key(self.prefix))
        out = []
        for page in list_pages(self.client, self.bucket, folder_key(self._key(prefix))):
            out.extend(f"{obj['Key'][strip:]}\t{obj['Size']}" if obj["Key"].rpartition("/")[2] in sized
                       else obj["Key"][strip:] for obj in page.objects)
        return out

    def list_dirs(self, prefix):
        strip = len(folder_key(self.prefix))
        pages = list_pages(self.client, self.bucket, folder_key(self._key(prefix)), one_level=True)
        return sorted(folder[strip:].rstrip("/") for page in pages for folder in page.folders)

    def delete(self, rel):
        keys = [self._key(r) for r in self.list(rel)] or [self._key(rel)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def check_writable(self):
        client = s3_client(self.settings, probe=True)
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
