"""Data files anywhere: the images, masks and checkpoints a spec names, on a local disk or under any s3://
URI (not only in a run root). Reading them, listing a data set's folder with each file's version, and
what a file holds now, so that the plan sees a file rewritten in place as changed.

A version is what a file is now without reading it: `<size>-<mtime_ns>` on a local disk, the object's
ETag on S3. Versions come with listings (one stat per file, the ETags of the listing pages): a data set
of a million images costs no request per image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ray_consensus.errors import SpecError
from ray_consensus.spec.config import StorageSpec
from ray_consensus.storage.paths import folder_key, is_s3, join, safe_rel, split_s3
from ray_consensus.storage.s3 import get_bytes, head, list_pages, s3_client, s3_settings

_CLIENTS: dict = {}


def _client(spec: StorageSpec | None):
    """The process's client for data files under these settings, made once: every image a decode task reads
    shares its connections (a run root's `S3Store` has a client of its own)."""
    settings = s3_settings(spec)
    if settings not in _CLIENTS:
        _CLIENTS[settings] = s3_client(settings)
    return _CLIENTS[settings]


def read_uri_bytes(uri: str, spec: StorageSpec | None = None) -> bytes:
    """Bytes of a data file given by a local path or s3:// URI (images, masks, checkpoints); FileNotFoundError
    when there is none."""
    if is_s3(uri):
        return get_bytes(_client(spec), *split_s3(uri))
    return Path(uri.removeprefix("file://")).expanduser().read_bytes()


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
        bucket, key = split_s3(uri.rstrip("/"))
        prefix = folder_key(key.strip("/"))
        files, dirs = [], set()
        for page in list_pages(_client(spec), bucket, prefix):
            for obj in page.objects:
                rel = obj["Key"][len(prefix):]
                if "/" in rel:
                    dirs.add(rel.split("/", 1)[0])
                if rel and not rel.endswith("/"):
                    files.append(Listed(join(uri, safe_rel(rel)), _etag(obj)))
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

    parents = sorted({u.rpartition("/")[0] for u in uris})
    on_s3 = any(is_s3(p) for p in parents)
    client = _client(spec) if on_s3 else None  # made before the threads, which share it

    def folder(parent: str) -> list[tuple[str, str]]:
        if is_s3(parent):
            bucket, key = split_s3(parent)
            return [(f"s3://{bucket}/{o['Key']}", _etag(o))
                    for page in list_pages(client, bucket, folder_key(key), one_level=True) for o in page.objects]
        try:
            with os.scandir(parent or "/") as entries:  # (a name that is not UTF-8 is in no manifest)
                return [(f"{parent}/{e.name}", _local_version(e.stat())) for e in entries
                        if e.is_file() and is_utf8(e.name)]
        except OSError:
            return []

    with ThreadPoolExecutor(16 if on_s3 else 1) as pool:
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
        found = head(_client(spec), *split_s3(uri))
        return _etag(found) if found is not None else ""
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
