"""Content-addressed blob store: ``ROOT/sha256/ab/cdef...`` (the digest split after two hex digits).

A blob is streamed into a temp file ``ROOT/sha256/.tmp-*`` (same filesystem, so the rename is
atomic), hashed while written in 1 MiB chunks, fsynced, made read-only and renamed into place; the
directory is fsynced too. Identical content is stored once. Reads that feed a model go through
``open_verified`` / ``path_verified``, which hash the bytes again.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from atmoe.errors import ChecksumMismatch, UsageError

CHUNK_SIZE = 1 << 20
TEMP_PREFIX = ".tmp-"
ALGORITHM = "sha256"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# Called with each chunk while a blob streams in; raising aborts the write and stores nothing.
Inspect = Callable[[memoryview], None]


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    size: int
    created: bool  # False when identical content was already in the store


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UsageError(f"not a sha256 digest: {digest!r}")
    return digest


def sha256_file(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / ALGORITHM

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def ensure(self) -> None:
        self.blobs_dir.mkdir(parents=True, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------
    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.blobs_dir / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path_for(digest).stat().st_size

    # -- writing -----------------------------------------------------------------------------
    def put_stream(self, source: BinaryIO, *, inspect: Inspect | None = None) -> StoredBlob:
        """Store the bytes of ``source`` (read to its end) and return their digest."""
        self.ensure()
        fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.blobs_dir)
        temp = Path(temp_name)
        try:
            hasher = hashlib.sha256()
            size = 0
            buffer = bytearray(CHUNK_SIZE)
            view = memoryview(buffer)
            while n := source.readinto(buffer):  # type: ignore[attr-defined]
                chunk = view[:n]
                if inspect is not None:
                    inspect(chunk)
                hasher.update(chunk)
                offset = 0
                while offset < n:
                    offset += os.write(fd, chunk[offset:])
                size += n
            os.fsync(fd)
            os.close(fd)
            fd = -1
            digest = hasher.hexdigest()
            final = self.path_for(digest)
            if final.is_file() and final.stat().st_size == size:
                # Already stored. Touch it so that a concurrent gc (grace period) keeps it until
                # the caller's database row that references it is committed.
                os.utime(final)
                temp.unlink()
                return StoredBlob(digest, size, created=False)
            os.chmod(temp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.blobs_dir)
            os.replace(temp, final)  # also heals a damaged blob of the wrong size
            _fsync_dir(final.parent)
            return StoredBlob(digest, size, created=True)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            temp.unlink(missing_ok=True)
            raise

    def put_file(self, path: str | os.PathLike[str], *, inspect: Inspect | None = None) -> StoredBlob:
        with open(path, "rb", buffering=0) as handle:
            return self.put_stream(handle, inspect=inspect)

    def put_bytes(self, data: bytes) -> StoredBlob:
        import io

        return self.put_stream(io.BytesIO(data))

    # -- reading -----------------------------------------------------------------------------
    def _missing(self, digest: str) -> ChecksumMismatch:
        return ChecksumMismatch(f"blob sha256:{digest} is missing from the store {self.root}")

    def _altered(self, digest: str, actual: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"blob sha256:{digest} is altered on disk (its bytes hash to sha256:{actual}); "
            "restore it from a copy or remove what references it"
        )

    def check(self, digest: str) -> str | None:
        """Hash the blob again; return None when intact, else a one-line problem."""
        try:
            self.path_verified(digest)
        except ChecksumMismatch as error:
            return str(error)
        return None

    def path_verified(self, digest: str) -> Path:
        """The blob's path, after checking that its bytes still hash to ``digest``."""
        path = self.path_for(digest)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise self._missing(digest) from None
        if actual != digest:
            raise self._altered(digest, actual)
        return path

    def open_verified(self, digest: str) -> bytes:
        """The blob's bytes, after checking that they still hash to ``digest``."""
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._missing(digest) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise self._altered(digest, actual)
        return data

    # -- listing and removal (gc) ---------------------------------------------------------------
    def iter_digests(self) -> Iterator[str]:
        if not self.blobs_dir.is_dir():
            return
        for sub in sorted(self.blobs_dir.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for blob in sorted(sub.iterdir()):
                digest = sub.name + blob.name
                if _DIGEST.match(digest) and blob.is_file():
                    yield digest

    def iter_temp_files(self) -> Iterator[Path]:
        if not self.blobs_dir.is_dir():
            return
        yield from sorted(self.blobs_dir.glob(TEMP_PREFIX + "*"))
        yield from sorted(self.blobs_dir.glob(f"??/{TEMP_PREFIX}*"))

    def remove(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)
