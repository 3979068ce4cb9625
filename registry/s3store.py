"""Blob store in an S3-compatible bucket: ``s3://BUCKET/PREFIX/sha256/ab/cdef...``, the layout of the
local store, with a local store (``ATMOE_CACHE``) as its cache of verified blobs.

The endpoint, credentials and region come from the standard AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``), so AWS S3,
MinIO, Ceph and R2 all serve; the client is boto3 (``pip install 'atmoe-registry[s3]'``).

The guarantees of the local store hold:

- *content addressing*: a blob is first streamed into the cache, hashed (and inspected) as it is
  written there, so its key is known before a byte leaves the machine; then uploaded from that
  file (multipart above ``PART_SIZE``, with a progress bar on a terminal) and checked in place
  (its size, by ``HEAD``). The caller commits its row only after that, under the blob lock.
- *stored once*: a key already holding an object of that size whose ETag is the MD5 of these
  bytes (whole, or of ``PART_SIZE`` parts as a multipart upload makes it) is not uploaded again; it
  is *touched* instead (copied onto itself), which renews its age so that a concurrent gc, which
  keeps young blobs, keeps it until the row is committed. Any other object at the key (altered,
  truncated) is replaced by the good bytes: a re-add heals the bucket, as it heals a local store.
- *every read that feeds a model is re-hashed*: reads go through the cache; a blob missing there is
  fetched and stored in the cache only if it hashes to its digest; a cached blob is hashed again on
  every use, and a damaged cached copy is dropped and fetched again. ``check`` (``verify``) hashes
  the bucket's own bytes, never the cache.
- *gc*: ages are the objects' ``LastModified`` on the server's clock, and the cut-off is taken on
  that clock too (the ``Date`` of the listing), so a gc on a machine whose clock is off cannot take
  a young blob for an old one; the temporaries gc removes are multipart uploads started before the
  cut-off and never completed (a writer killed mid-upload).

Time-outs and retries are bounded (``CONNECT_TIMEOUT``, ``READ_TIMEOUT``, ``AWS_MAX_ATTEMPTS``
attempts, standard retry mode); a failure that outlasts them is one ``StoreUnavailable`` line.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from atmoe.errors import ChecksumMismatch, StoreUnavailable
from atmoe.registry.config import S3Location
from atmoe.registry.store import (
    _DIGEST,
    ALGORITHM,
    CATALOG_MARKER,
    CHUNK_SIZE,
    BlobInfo,
    BlobStore,
    DigestMismatch,
    Inspect,
    StoredBlob,
    StoreWrites,
    check_digest,
    open_regular,
)

T = TypeVar("T")

PART_SIZE = 8 << 20  # multipart threshold and part size (S3's minimum part is 5 MiB)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
DEFAULT_ATTEMPTS = 5
COPY_LIMIT = 5 << 30  # copy_object's limit; larger objects are touched by a managed (multipart) copy
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}

# progress(description, total_bytes) -> a context manager giving advance(n_bytes)
Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


class _EtagHasher:
    """The ETags S3 gives these bytes: the MD5 of the whole (a single PUT, or a copy) and, for a
    multipart upload of ``part_size`` parts, the MD5 of the parts' MD5s and ``-N``."""

    def __init__(self, part_size: int = PART_SIZE) -> None:
        self.part_size = part_size
        self.whole = hashlib.md5(usedforsecurity=False)
        self.part = hashlib.md5(usedforsecurity=False)
        self.part_left = part_size
        self.parts: list[bytes] = []
        self.size = 0

    def update(self, chunk: memoryview) -> None:
        self.whole.update(chunk)
        self.size += len(chunk)
        while len(chunk):
            taken = chunk[: self.part_left]
            self.part.update(taken)
            self.part_left -= len(taken)
            chunk = chunk[len(taken) :]
            if self.part_left == 0:
                self.parts.append(self.part.digest())
                self.part = hashlib.md5(usedforsecurity=False)
                self.part_left = self.part_size

    def etags(self) -> set[str]:
        tags = {self.whole.hexdigest()}
        parts = list(self.parts)
        if self.part_left != self.part_size:
            parts.append(self.part.digest())
        if parts:
            tags.add(f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}")
        return tags


class _Reader:
    """``readinto`` over a botocore streaming body (which offers ``read`` only)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readinto(self, buffer: bytearray) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _terminal_progress(description: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
    """A rich progress bar on stderr when stderr is a terminal; silent otherwise."""
    import sys
    from contextlib import contextmanager

    if not sys.stderr.isatty():
        return nullcontext(lambda _n: None)

    @contextmanager
    def bar() -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()) as shown:
            task = shown.add_task(description, total=total)
            yield lambda n: shown.advance(task, n)

    return bar()


class S3Store(StoreWrites):
    """The blob store of a catalog in ``s3://BUCKET/PREFIX``; see the module's docstring."""

    def __init__(
        self,
        location: S3Location,
        cache: str | os.PathLike[str],
        *,
        client: Any = None,
        progress: Progress | None = None,
    ) -> None:
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.root = str(location)  # what messages call the store
        self.cache = BlobStore(cache)
        self.progress: Progress = progress or _terminal_progress
        self._skew = 0.0  # server clock minus this machine's, as last read by now()
        if client is not None:
            self.__dict__["client"] = client

    def __repr__(self) -> str:
        return f"S3Store({self.root!r}, cache={str(self.cache.root)!r})"

    @property
    def location(self) -> str:
        return self.root

    # -- the client and its failures -------------------------------------------------------------
    @functools.cached_property
    def client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable(
                f"{self.root}: an s3:// store needs boto3: pip install 'atmoe-registry[s3]'"
            ) from None
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_ATTEMPTS)
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": attempts, "mode": os.environ.get("AWS_RETRY_MODE") or "standard"},
        )
        try:
            return boto3.session.Session().client("s3", config=config)
        except Exception as error:  # noqa: BLE001 - a bad profile, region or endpoint setting
            raise self._unavailable(error) from None

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        text = " ".join(str(error).split()) or type(error).__name__
        return StoreUnavailable(f"{self.root}: the object store failed ({type(error).__name__}: {text})")

    def _call(self, operation: str, /, **arguments: Any) -> Any:
        """One S3 call; ``None`` when the object (or upload) is not there, else ``StoreUnavailable``
        for any failure that outlasted the retries (no bucket, no access, no network)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **arguments)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND or code == "NoSuchUpload":
                return None
            if code == "NoSuchBucket":
                raise StoreUnavailable(f"{self.root}: the bucket {self.bucket!r} does not exist") from None
            raise self._unavailable(error) from None
        except BotoCoreError as error:
            raise self._unavailable(error) from None

    def key_for(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}{ALGORITHM}/{digest[:2]}/{digest[2:]}"

    def _digest_of(self, key: str) -> str | None:
        head = f"{self.prefix}{ALGORITHM}/"
        if not key.startswith(head):
            return None
        sub, _, rest = key[len(head) :].partition("/")
        digest = sub + rest
        return digest if len(sub) == 2 and _DIGEST.match(digest) else None

    # -- the bucket and its catalog --------------------------------------------------------------
    def ensure(self) -> None:
        """Check that the bucket answers (it is not created: a team's bucket is made by its admin)."""
        if self._call("head_bucket") is None:
            raise StoreUnavailable(f"{self.root}: the bucket {self.bucket!r} does not exist")

    def catalog_id(self) -> str | None:
        import re

        response = self._call("get_object", Key=self.prefix + CATALOG_MARKER)
        if response is None:
            return None
        text = response["Body"].read(64).decode("ascii", "replace").strip()
        return text if re.fullmatch(r"[0-9a-f]{32}", text) else None

    def mark(self, catalog_id: str) -> None:
        self._call("put_object", Key=self.prefix + CATALOG_MARKER, Body=(catalog_id + "\n").encode("ascii"))

    def holds_blobs(self) -> bool:
        response = self._call("list_objects_v2", Prefix=f"{self.prefix}{ALGORITHM}/", MaxKeys=1)
        return bool(response and response.get("KeyCount"))

    # -- single blobs ----------------------------------------------------------------------------
    def stat(self, digest: str) -> BlobInfo | None:
        response = self._call("head_object", Key=self.key_for(digest))
        if response is None:
            return None
        return BlobInfo(int(response["ContentLength"]), response["LastModified"].timestamp())

    def has(self, digest: str) -> bool:
        return self.stat(digest) is not None

    def size(self, digest: str) -> int:
        info = self.stat(digest)
        if info is None:
            raise FileNotFoundError(digest)
        return info.size

    def now(self) -> float:
        """The server's clock: the ``Date`` of a cheap request (the local clock if it gives none)."""
        import time

        response = self._call("list_objects_v2", Prefix=f"{self.prefix}{ALGORITHM}/", MaxKeys=1)
        date = ((response or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})).get("date")
        local = time.time()
        try:
            server = parsedate_to_datetime(date).timestamp() if date else local
        except (TypeError, ValueError):
            server = local
        self._skew = server - local
        return server

    # -- writing ---------------------------------------------------------------------------------
    def put_stream(
        self, source: BinaryIO, *, inspect: Inspect | None = None, expected: str | None = None
    ) -> StoredBlob:
        """Hash ``source`` into the cache, then make the bucket hold it (see the module's docstring)."""
        etags = _EtagHasher()

        def look(chunk: memoryview) -> None:
            if inspect is not None:
                inspect(chunk)
            etags.update(chunk)

        cached = self.cache.put_stream(source, inspect=look, expected=expected)
        digest, size, key = cached.digest, cached.size, self.key_for(cached.digest)
        head = self._call("head_object", Key=key)
        if head is not None and int(head["ContentLength"]) == size and head.get("ETag", "").strip('"') in etags.etags():
            if self._touch(key, size):
                return StoredBlob(digest, size, created=False)
        self._upload(self.cache.path_for(digest), key, digest, size)
        return StoredBlob(digest, size, created=True)

    def _touch(self, key: str, size: int) -> bool:
        """Renew the object's age by copying it onto itself; False when it vanished (a gc)."""
        from botocore.exceptions import BotoCoreError, ClientError

        source = {"Bucket": self.bucket, "Key": key}
        extra = {"MetadataDirective": "REPLACE", "Metadata": {"touched": "1"}}
        if size <= COPY_LIMIT:
            return self._call("copy_object", Key=key, CopySource=source, **extra) is not None
        try:
            self.client.copy(source, self.bucket, key, ExtraArgs=extra)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in _NOT_FOUND:
                return False
            raise self._unavailable(error) from None
        except BotoCoreError as error:
            raise self._unavailable(error) from None
        return True

    def _upload(self, path: Path, key: str, digest: str, size: int) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4)
        shown = self.progress(f"upload sha256:{digest[:12]}", size) if size >= PART_SIZE else nullcontext(None)
        with shown as advance:
            try:
                self.client.upload_file(
                    str(path), self.bucket, key, ExtraArgs={"Metadata": {ALGORITHM: digest}}, Config=config,
                    Callback=advance,
                )  # fmt: skip
            except (BotoCoreError, ClientError) as error:
                raise self._unavailable(error) from None
            except Exception as error:  # s3transfer wraps the client's failures in its own errors
                if type(error).__module__.startswith(("s3transfer", "boto3", "botocore")):
                    raise self._unavailable(error) from None
                raise
        placed = self.stat(digest)
        if placed is None or placed.size != size:
            raise StoreUnavailable(
                f"{self.root}: sha256:{digest} is not in place after its upload; nothing was committed"
            )

    # -- reading ---------------------------------------------------------------------------------
    def _missing(self, digest: str) -> ChecksumMismatch:
        return ChecksumMismatch(f"blob sha256:{digest} is missing from the store {self.root}")

    def _altered(self, digest: str, actual: str) -> DigestMismatch:
        return DigestMismatch(
            f"blob sha256:{digest} is altered in the store {self.root} (its bytes hash to sha256:{actual}); "
            "restore it from a copy (a re-add or import of the same content heals it)",
            expected=digest,
            actual=actual,
        )

    def _fetch(self, digest: str) -> None:
        """Bring the blob into the cache, only if its bytes hash to ``digest``."""
        response = self._call("get_object", Key=self.key_for(digest))
        if response is None:
            raise self._missing(digest)
        try:
            self.cache.put_stream(_Reader(response["Body"]), expected=digest)
        except DigestMismatch as error:
            raise self._altered(digest, error.actual) from None
        except Exception as error:  # a connection lost mid-read: botocore's or urllib3's errors
            if type(error).__module__.startswith(("botocore", "urllib3")):
                raise self._unavailable(error) from None
            raise

    def local_path(self, digest: str) -> Path:
        if not self.cache.has(digest):
            self._fetch(digest)
        return self.cache.path_for(digest)

    def _through_cache(self, read: Callable[[str], T], digest: str) -> T:
        """``read`` (a verifying read of the cache) of the blob, fetched first when it is not cached; a
        damaged cached copy is dropped and fetched again: the bucket's bytes decide."""
        if self.cache.has(digest):
            try:
                return read(digest)
            except ChecksumMismatch:
                self.cache.remove(digest)
        self._fetch(digest)
        return read(digest)

    def path_verified(self, digest: str) -> Path:
        return self._through_cache(self.cache.path_verified, digest)

    def open_verified(self, digest: str) -> bytes:
        return self._through_cache(self.cache.open_verified, digest)

    def open_stream(self, digest: str) -> BinaryIO:
        return open_regular(self.path_verified(digest))

    def check(self, digest: str) -> str | None:
        """Hash the bucket's bytes (not the cache's); None when intact, else a one-line problem."""
        response = self._call("get_object", Key=self.key_for(digest))
        if response is None:
            return str(self._missing(digest))
        hasher = hashlib.sha256()
        body = response["Body"]
        try:
            while chunk := body.read(CHUNK_SIZE):
                hasher.update(chunk)
        except Exception as error:  # noqa: BLE001 - a connection lost mid-read
            raise self._unavailable(error) from None
        actual = hasher.hexdigest()
        return str(self._altered(digest, actual)) if actual != digest else None

    # -- listing and removal (gc) ------------------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[str, BlobInfo]]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}{ALGORITHM}/"
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    digest = self._digest_of(item["Key"])
                    if digest is not None:
                        yield digest, BlobInfo(int(item["Size"]), item["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as error:
            raise self._unavailable(error) from None

    def iter_digests(self) -> Iterator[str]:
        for digest, _ in self.iter_blobs():
            yield digest

    def remove(self, digest: str) -> None:
        self._call("delete_object", Key=self.key_for(digest))

    def stale_temporaries(self, cutoff: float) -> list[str]:
        """Multipart uploads under the prefix started before ``cutoff`` (server clock) and never
        completed, as ``s3://BUCKET/KEY#UPLOAD_ID`` (an upload runs far shorter than gc's grace
        period), and the cache's temp files that a killed writer left."""
        stale = self.cache.stale_temporaries(cutoff - self._skew)
        marker: dict[str, str] = {}
        while True:
            response = self._call("list_multipart_uploads", Prefix=self.prefix, **marker) or {}
            for upload in response.get("Uploads", ()):
                if upload["Initiated"].timestamp() <= cutoff:
                    stale.append(f"s3://{self.bucket}/{upload['Key']}#{upload['UploadId']}")
            if not response.get("IsTruncated"):
                return stale
            marker = {"KeyMarker": response["NextKeyMarker"], "UploadIdMarker": response["NextUploadIdMarker"]}

    def remove_temporary(self, name: str) -> bool:
        upload = f"s3://{self.bucket}/"
        if not name.startswith(upload):
            return self.cache.remove_temporary(name)
        key, _, upload_id = name[len(upload) :].rpartition("#")
        return self._call("abort_multipart_upload", Key=key, UploadId=upload_id) is not None
