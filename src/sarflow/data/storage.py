"""Object storage (MinIO on a cluster, any S3-compatible server in tests) and local files.

Configuration comes from the standard AWS variables, so the same settings drive the
`minio` client, GDAL's /vsis3/, s3fs and dvc-s3:

- ``AWS_ENDPOINT_URL`` (or ``SARFLOW_S3_ENDPOINT``): e.g. ``http://127.0.0.1:9000``
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; ``AWS_REGION`` (default us-east-1)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING

import urllib3

from sarflow.errors import StorageError

if TYPE_CHECKING:  # minio is imported on use: a local run never pays for it
    from minio import Minio

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    access_key: str | None
    secret_key: str | None
    region: str

    @property
    def secure(self) -> bool:
        return urlparse(self.endpoint_url).scheme == "https"

    @property
    def netloc(self) -> str:
        return urlparse(self.endpoint_url).netloc

    def gdal_options(self) -> dict[str, object]:
        """Keyword arguments of rasterio.Env for /vsis3/ against this endpoint (path-style, as
        MinIO wants): GDAL configuration options, and the credentials as a `session` (rasterio
        refuses AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY as plain configuration options)."""
        opts = {
            "AWS_S3_ENDPOINT": self.netloc,
            "AWS_HTTPS": "YES" if self.secure else "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_REGION": self.region,
            "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
            "GDAL_HTTP_MAX_RETRY": "1",
            "GDAL_HTTP_TIMEOUT": "20",
        }
        if self.access_key and self.secret_key:
            opts["session"] = _gdal_session(self.access_key, self.secret_key, self.region)
        else:
            opts["AWS_NO_SIGN_REQUEST"] = "YES"
        return opts


def _gdal_session(access_key: str, secret_key: str, region: str):
    """A rasterio session that hands GDAL these static credentials (rasterio's own AWSSession
    would need boto3, which sarflow does not depend on)."""
    from rasterio.session import Session

    class StaticS3Session(Session):
        def __init__(self):
            self._creds = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key, "aws_region": region}

        @classmethod
        def hascreds(cls, config) -> bool:
            return "AWS_ACCESS_KEY_ID" in config and "AWS_SECRET_ACCESS_KEY" in config

        @property
        def credentials(self) -> dict:
            return dict(self._creds)

        def get_credential_options(self) -> dict:
            return {k.upper(): v for k, v in self._creds.items()}

    return StaticS3Session()


def s3_settings() -> S3Settings:
    endpoint = os.environ.get("SARFLOW_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return S3Settings(
        endpoint_url=endpoint.rstrip("/"),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(uri, "not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def minio_client(settings: S3Settings | None = None) -> Minio:
    from minio import Minio

    s = settings or s3_settings()
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3.0, read=30.0),
        retries=urllib3.Retry(total=1, backoff_factor=0.2, status_forcelist=[502, 503, 504]),
    )
    return Minio(s.netloc, access_key=s.access_key, secret_key=s.secret_key, secure=s.secure, region=s.region, http_client=http)


def _bucket_missing(uri: str, settings: S3Settings) -> bool:
    """True only when the server says the URI's bucket does not exist (False when unsure)."""
    try:
        return not minio_client(settings).bucket_exists(split_s3(uri)[0])
    except Exception:  # noqa: BLE001 - only a refinement of an error being reported
        return False


def explain_s3_error(uri: str, exc: Exception, settings: S3Settings) -> StorageError:
    """One StorageError naming `uri` and the cause of an S3 request's failure."""
    from minio.error import S3Error

    if isinstance(exc, S3Error):
        if exc.code == "NoSuchBucket":
            return StorageError(uri, f"bucket {split_s3(uri)[0]!r} does not exist at {settings.endpoint_url}")
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            # a HEAD (stat) answers a bare 404 that minio reports as NoSuchKey even when the
            # bucket is missing: ask the server which one it is
            if _bucket_missing(uri, settings):
                return StorageError(uri, f"bucket {split_s3(uri)[0]!r} does not exist at {settings.endpoint_url}")
            return StorageError(uri, f"object does not exist at {settings.endpoint_url}")
        if exc.code in _AUTH_CODES:
            return StorageError(uri, f"the S3 server at {settings.endpoint_url} refused the credentials ({exc.code})")
        return StorageError(uri, f"S3 error {exc.code}: {exc.message}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return StorageError(uri, f"S3 endpoint {settings.endpoint_url} is unreachable ({type(exc).__name__})")
    return StorageError(uri, f"{type(exc).__name__}: {exc}")


def check_s3_object(uri: str, settings: S3Settings | None = None) -> tuple[int, str]:
    """Checks that the object exists and can be read with the configured credentials; returns its size
    and its stamp (`file_stamp`)."""
    s = settings or s3_settings()
    bucket, key = split_s3(uri)
    try:
        st = minio_client(s).stat_object(bucket, key)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear StorageError
        raise explain_s3_error(uri, e, s) from None
    return st.size, f"etag:{st.etag}"


def file_stamp(uri: str) -> tuple[int, str]:
    """A file's size and stamp: what changes whenever its bytes are rewritten, read without reading them
    (an S3 object's ETag; a local file's modification and change times in ns, device and inode: the
    change time is the kernel's, which `cp -p`, `touch -r` or `rsync -t` cannot set back). A checksum
    recorded with a stamp holds while the file has that stamp: the records of
    `data/ingest.checksum_files`."""
    if is_s3(uri):
        return check_s3_object(uri)
    st = Path(uri).stat()
    return st.st_size, f"mtime_ns:{st.st_mtime_ns}:ctime_ns:{st.st_ctime_ns}:dev:{st.st_dev}:ino:{st.st_ino}"


LISTING_OBJECTS_PER_KEY = 4  # objects listed per object asked for, at most (then one HEAD each) ...
LISTING_PAGE = 1000  # ... plus one page of a listing


def listed_s3_stamps(uris: list[str], settings: S3Settings | None = None) -> dict[str, tuple[int, str]]:
    """The sizes and stamps (`file_stamp`: the ETag a HEAD answers, which a listing shows too) of S3
    objects from their folders' listings: one LIST request per 1,000 objects of a folder (between the
    first and the last object asked for, and at most LISTING_OBJECTS_PER_KEY per object asked for, plus
    a page) instead of one HEAD per object. An object the listing does not show, or a folder that
    cannot be listed (a policy may allow GET and not LIST), is left out: the caller asks for it alone
    (`file_stamp`), which names what is wrong."""
    s = settings or s3_settings()
    folders: dict[tuple[str, str], set[str]] = {}
    for uri in uris:
        bucket, key = split_s3(uri)
        folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        folders.setdefault((bucket, folder), set()).add(key)
    stamps = {}
    client = minio_client(s) if folders else None
    for (bucket, folder), keys in folders.items():
        first, last = min(keys), max(keys)
        budget = LISTING_OBJECTS_PER_KEY * len(keys) + LISTING_PAGE  # a folder of millions: the rest asked for alone
        try:
            for seen, obj in enumerate(client.list_objects(bucket, prefix=folder, recursive=False,
                                                           start_after=first[:-1] if len(first) > len(folder) + 1
                                                           else None)):
                if obj.object_name > last or seen >= budget:
                    break
                if obj.object_name in keys and obj.size is not None and obj.etag:
                    stamps[f"s3://{bucket}/{obj.object_name}"] = (int(obj.size), f"etag:{obj.etag}")
        except Exception:  # noqa: BLE001 - not listable: each object is asked for alone
            continue
    return stamps


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    s = s3_settings()
    bucket, key = split_s3(uri)
    try:
        resp = minio_client(s).get_object(bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()
    except Exception as e:  # noqa: BLE001
        raise explain_s3_error(uri, e, s) from None


def sha256_of(uri: str, chunk: int = 8 << 20) -> str:
    """sha256 of a local file or an S3 object, streamed."""
    h = hashlib.sha256()
    if not is_s3(uri):
        with open(uri, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    s = s3_settings()
    bucket, key = split_s3(uri)
    try:
        resp = minio_client(s).get_object(bucket, key)
        try:
            for block in resp.stream(chunk):
                h.update(block)
        finally:
            resp.close()
            resp.release_conn()
    except Exception as e:  # noqa: BLE001
        raise explain_s3_error(uri, e, s) from None
    return h.hexdigest()


def gdal_path(uri: str) -> str:
    """The path GDAL opens: /vsis3/bucket/key for s3://, the path itself otherwise."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"/vsis3/{bucket}/{key}"
    return uri


def upload_file(local: str | Path, uri: str, settings: S3Settings | None = None) -> None:
    s = settings or s3_settings()
    bucket, key = split_s3(uri)
    try:
        minio_client(s).fput_object(bucket, key, str(local))
    except Exception as e:  # noqa: BLE001
        raise explain_s3_error(uri, e, s) from None


def ensure_bucket(bucket: str, settings: S3Settings | None = None) -> None:
    s = settings or s3_settings()
    try:
        client = minio_client(s)
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    except Exception as e:  # noqa: BLE001
        raise explain_s3_error(f"s3://{bucket}", e, s) from None


def check_bucket(uri: str, settings: S3Settings | None = None) -> None:
    """The bucket of an s3:// URI exists (a StorageError naming the URI otherwise, or when the
    server cannot be asked)."""
    s = settings or s3_settings()
    bucket = split_s3(uri.rstrip("/") + "/")[0]
    try:
        found = minio_client(s).bucket_exists(bucket)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear StorageError
        raise explain_s3_error(uri, e, s) from None
    if not found:
        raise StorageError(uri, f"bucket {bucket!r} does not exist at {s.endpoint_url}")


def s3_filesystem(settings: S3Settings | None = None):
    """An s3fs filesystem on the configured endpoint and credentials (no instance or listings cache,
    so a listing right after a write sees it); pyarrow.dataset and pandas accept it as `filesystem`."""
    import s3fs

    return s3fs.S3FileSystem(**s3_storage_options(settings))


def s3_storage_options(settings: S3Settings | None = None) -> dict:
    """s3fs keyword arguments for the configured endpoint and credentials (no instance or listings
    cache): what `s3_filesystem` builds on, and zarr's `storage_options` for an s3:// store."""
    s = settings or s3_settings()
    return {"key": s.access_key, "secret": s.secret_key, "anon": not (s.access_key and s.secret_key),
            "endpoint_url": s.endpoint_url, "client_kwargs": {"region_name": s.region},
            "skip_instance_cache": True, "use_listings_cache": False}
