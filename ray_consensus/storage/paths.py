"""Paths and URIs as strings: which are on S3, how a relative path joins a root and may not leave it, and
how an s3:// URI or key names a folder. Pure functions: no I/O, no imports of the package."""

from __future__ import annotations

import posixpath
from urllib.parse import urlparse


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


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI: `s3://b/a/x.jpg` -> ('b', 'a/x.jpg')."""
    u = urlparse(uri)
    return u.netloc, u.path.lstrip("/")


def folder_key(key: str) -> str:
    """The key prefix that lists what is inside the folder `key` and nothing beside it: `a/b` -> 'a/b/'
    (not 'a/b', which also lists 'a/bc/...'); '' (a bucket's top level) stays ''."""
    return f"{key}/" if key else ""
