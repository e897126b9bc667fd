"""Talking to an S3-compatible store: connection settings, the one boto3 client factory, pyarrow's S3
filesystem, and the three requests every caller shares (a paginated listing, a GET, a HEAD) with the one
test of "this object is not there".

Settings come from the spec or the standard AWS variables/profiles; they live only in memory and are
never written anywhere. boto3 and botocore are imported when first needed: a run on a local disk never
loads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple
from urllib.parse import urlparse

from ray_consensus.spec.config import StorageSpec


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


def s3_client(settings: S3Settings, *, probe: bool = False):
    """A boto3 S3 client. Two retry policies, because two kinds of caller want opposite things:
    * `probe=False` (every read, write and listing of data and run roots): patient, 10 attempts, 10 s to
      connect, 60 s to read, so that a long run rides out a store that is slow or briefly down;
    * `probe=True` (the preflight's check that a run root can be written): 2 attempts, 3 s to connect,
      5 s to read, so that a wrong endpoint or a store that is down is one line within seconds, before
      the run starts, instead of minutes of retries."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3 if probe else 10, read_timeout=5 if probe else 60,
                    retries={"max_attempts": 2 if probe else 10, "mode": "standard"},
                    max_pool_connections=32,  # the listing's and read-ahead's threads (16 each) share a client
                    s3={"addressing_style": "path"} if settings.endpoint_url else None)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
                        aws_session_token=settings.session_token, config=config)


def arrow_s3(settings: S3Settings):
    """pyarrow's S3 filesystem for these settings (the endpoint passed explicitly: pyarrow ignores
    AWS_ENDPOINT_URL), retrying as patiently as `s3_client`."""
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


def describe_s3_error(e: Exception, bucket: str, endpoint: str | None) -> str:
    """One line for the user about an error reaching `bucket` (no credentials, no endpoint, no bucket,
    access denied)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint or "AWS S3"
    if isinstance(e, NoCredentialsError):
        return ("no S3 credentials: set storage.access_key_id/secret_access_key or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(e, EndpointConnectionError) or "Connect" in type(e).__name__ or "Timeout" in type(e).__name__:
        return f"cannot reach the S3 endpoint {where} ({type(e).__name__})"
    if isinstance(e, ClientError):
        code = _code(e)
        if code in ("404", "NoSuchBucket"):
            return f"bucket '{bucket}' does not exist at {where}"
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return f"access to bucket '{bucket}' at {where} denied ({code}): check the access key and secret key"
        return f"S3 error on bucket '{bucket}' at {where}: {code}"
    return f"S3 error on bucket '{bucket}' at {where}: {type(e).__name__}"


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def is_missing(e: BaseException) -> bool:
    """Whether an S3 error says that the object is not there: a GET answers NoSuchKey, a HEAD (which has no
    body to name an error) a bare 404, some stores NotFound. Any other error (403, 500, a timeout) is
    not "missing": callers raise it."""
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and _code(e) in ("404", "NoSuchKey", "NotFound")


def get_bytes(client, bucket: str, key: str) -> bytes:
    """An object's bytes; FileNotFoundError when it is not there (`is_missing`)."""
    from botocore.exceptions import ClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    for attempt in range(3):  # botocore retries the request, not a body cut off after it: ask again
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if is_missing(e):
                raise FileNotFoundError(f"s3://{bucket}/{key}") from None
            raise
        except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
            if attempt == 2:
                raise


def head(client, bucket: str, key: str) -> dict | None:
    """An object's HEAD response (size, ETag, ...); None when it is not there (`is_missing`)."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_missing(e):
            return None
        raise


class Page(NamedTuple):
    """One page of a listing: the objects' entries (dicts with 'Key', 'Size', 'ETag', ...) and, when
    listing one level, the keys of the folders in it ('a/b/', ending with '/')."""

    objects: list[dict]
    folders: list[str]


def list_pages(client, bucket: str, prefix: str, *, one_level: bool = False,
               page_size: int | None = None) -> Iterator[Page]:
    """Every page of the listing of the keys starting with `prefix` (`paths.folder_key` for a folder), in key
    order: every object below it, or with `one_level` the objects directly in it and its sub-folders.
    `page_size` keys per page (None: the store's most, 1,000 on S3); the caller sees every key
    whatever the page size."""
    one = {"Delimiter": "/"} if one_level else {}
    config = {"PageSize": page_size} if page_size else {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **one,
                                                                 PaginationConfig=config):
        yield Page(page.get("Contents", []), [p["Prefix"] for p in page.get("CommonPrefixes", [])])
