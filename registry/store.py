"""Content-addressed blob store on a local (or mounted) filesystem: ``ROOT/sha256/ab/cdef...`` (the
digest split after two hex digits). ``s3store.py`` keeps the same layout in an S3 bucket, with this
store as its local cache; both offer the methods ``integrity``, ``experts``, ``build`` and the
archive use (``location``, ``put_*``, ``has``/``stat``, ``check``, ``path_verified``/``open_verified``,
``iter_blobs``, ``remove``, the temporaries gc removes, the catalog marker).

A blob is streamed into a temp file ``ROOT/sha256/.tmp-*`` (same filesystem, so the rename is
atomic), hashed while written in 1 MiB chunks, fsynced, made read-only and renamed into place; the
directory is fsynced too. Identical content is stored once. Reads that feed a model go through
``open_verified`` / ``path_verified``, which hash the bytes again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from atmoe.errors import ChecksumMismatch, InvalidAdapter, UsageError

CHUNK_SIZE = 1 << 20
TEMP_PREFIX = ".tmp-"
CATALOG_MARKER = "catalog-id"  # the id of the catalog the store belongs to
ALGORITHM = "sha256"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# Called with each chunk while a blob streams in; raising aborts the write and stores nothing.
Inspect = Callable[[memoryview], None]


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    size: int
    created: bool  # False when identical content was already in the store


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob's size and age (modification time, seconds since the epoch, on the store's clock)."""

    size: int
    mtime: float


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UsageError(f"not a sha256 digest: {digest!r}")
    return digest


class DigestMismatch(ChecksumMismatch):
    """Bytes that hash to ``actual``, not to the ``expected`` digest they were read or stored as."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected, self.actual = expected, actual


class NotRegularFile(OSError):
    """A path that should be a blob is a FIFO, device, socket, directory or symbolic link."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading, refusing anything else without blocking on it: symbolic links
    are not followed (``O_NOFOLLOW``) and a FIFO does not wait for a writer (``O_NONBLOCK``);
    ``NotRegularFile`` then. A blob that is a FIFO or a link to /dev/zero would hang every reader."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
            raise NotRegularFile(errno.ELOOP, "a symbolic link, not a regular file", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open_regular(path) as handle:
        while n := handle.readinto(buffer):  # type: ignore[attr-defined]
            hasher.update(view[:n])
    return hasher.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def blob_mode() -> int:
    """Read-only for whoever the umask lets read: 0444 under umask 022, 0440 under 027, 0400 under 077.
    A team shares a store through a common group: umask 002 or 007 and a setgid group directory."""
    return 0o444 & ~current_umask()


def _lock(fd: int) -> None:
    """An exclusive advisory lock on ``fd`` (POSIX flock; a no-op where there is none)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # pragma: no cover - no flock on this platform or filesystem
        pass


def _try_lock(fd: int) -> bool:
    """Take the lock of ``fd`` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # pragma: no cover - a filesystem without flock: fall back to the age rule
        return True


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


class StoreWrites:
    """``put_file`` and ``put_bytes`` of every store, over its own ``put_stream``."""

    def put_stream(
        self, source: BinaryIO, *, inspect: Inspect | None = None, expected: str | None = None
    ) -> StoredBlob:  # pragma: no cover - each store defines it
        raise NotImplementedError

    def put_file(self, path: str | os.PathLike[str], *, inspect: Inspect | None = None) -> StoredBlob:
        """Store a regular file (a symbolic link or special file is refused, never followed or read)."""
        try:
            handle = open_regular(path)
        except NotRegularFile as error:
            raise InvalidAdapter(f"{path}: {error.strerror}; refused") from None
        with handle:
            return self.put_stream(handle, inspect=inspect)

    def put_bytes(self, data: bytes) -> StoredBlob:
        import io

        return self.put_stream(io.BytesIO(data))


class BlobStore(StoreWrites):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / ALGORITHM

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    @property
    def location(self) -> str:
        """Where the store is, as messages name it."""
        return str(self.root)

    def ensure(self) -> None:
        self.blobs_dir.mkdir(parents=True, exist_ok=True)

    # -- the catalog this store belongs to -------------------------------------------------------
    @property
    def marker_path(self) -> Path:
        return self.root / CATALOG_MARKER

    def catalog_id(self) -> str | None:
        """The id of the catalog this store belongs to (``store/catalog-id``), None if unmarked."""
        try:
            text = self.marker_path.read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return text if re.fullmatch(r"[0-9a-f]{32}", text) else None

    def mark(self, catalog_id: str) -> None:
        """Record ``catalog_id`` as this store's catalog (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.root)
        try:
            os.write(fd, (catalog_id + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.marker_path)

    def holds_blobs(self) -> bool:
        return next(iter(self.iter_digests()), None) is not None

    # -- paths -------------------------------------------------------------------------------
    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.blobs_dir / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        """Is the blob in the store as a regular file (a symbolic link or FIFO in its place is not)?"""
        try:
            return stat.S_ISREG(self.path_for(digest).lstat().st_mode)
        except FileNotFoundError:
            return False

    def size(self, digest: str) -> int:
        return self.path_for(digest).stat().st_size

    def stat(self, digest: str) -> BlobInfo | None:
        """Size and age of the blob, None when it is not in the store as a regular file."""
        try:
            info = self.path_for(digest).lstat()
        except FileNotFoundError:
            return None
        return BlobInfo(info.st_size, info.st_mtime) if stat.S_ISREG(info.st_mode) else None

    def local_path(self, digest: str) -> Path:
        """A local file holding the blob (not re-hashed: for a cheap re-read right after a put)."""
        return self.path_for(digest)

    @staticmethod
    def now() -> float:
        """The store's clock (gc's grace period is measured on it)."""
        import time

        return time.time()

    # -- writing -----------------------------------------------------------------------------
    def put_stream(
        self, source: BinaryIO, *, inspect: Inspect | None = None, expected: str | None = None
    ) -> StoredBlob:
        """Store the bytes of ``source`` (read to its end) and return their digest. With ``expected``,
        bytes that hash to anything else are not stored (``ChecksumMismatch``): a fetch into a cache."""
        self.ensure()
        fd, temp = self._locked_temp()
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
            digest = hasher.hexdigest()
            if expected is not None and digest != expected:
                raise self._altered(expected, digest)
            final = self.path_for(digest)
            if self._intact(final, digest, size):
                try:
                    # Already stored. Touch it so that a concurrent gc (grace period) keeps it until
                    # the caller's database row that references it is committed.
                    os.utime(final)
                    temp.unlink()
                    return StoredBlob(digest, size, created=False)
                except FileNotFoundError:
                    pass  # a gc removed it just now (or our temp file): store these bytes after all
            # new, or a damaged copy (altered bytes, wrong size, not a regular file): the good bytes
            # replace it atomically, so a re-add or an import heals the store
            os.chmod(temp, blob_mode())
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.blobs_dir)
            os.replace(temp, final)  # also heals a damaged blob of the wrong size
            _fsync_dir(final.parent)
            return StoredBlob(digest, size, created=True)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _locked_temp(self) -> tuple[int, Path]:
        """A new temp file in the store, open and locked. The lock is held until the file is renamed
        or removed: gc removes only temp files whose lock it can take, i.e. those a dead writer
        left (the kernel drops a process's locks with it). A gc may take the lock in the instant
        between creating the file and locking it; then the file is gone, and another is made."""
        while True:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.blobs_dir)
            _lock(fd)
            try:
                if os.stat(name).st_ino == os.fstat(fd).st_ino:
                    return fd, Path(name)
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def _intact(final: Path, digest: str, size: int) -> bool:
        """Does ``final`` already hold exactly these bytes (a regular file of this size and digest)?"""
        try:
            info = final.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return False
        try:
            return sha256_file(final) == digest
        except OSError:
            return False

    def open_stream(self, digest: str) -> BinaryIO:
        """The blob for reading (the caller hashes what it reads: the archive export does)."""
        try:
            return open_regular(self.path_for(digest))
        except FileNotFoundError:
            raise self._missing(digest) from None
        except NotRegularFile:
            raise self._not_regular(digest) from None

    # -- reading -----------------------------------------------------------------------------
    def _missing(self, digest: str) -> ChecksumMismatch:
        return ChecksumMismatch(f"blob sha256:{digest} is missing from the store {self.root}")

    def _altered(self, digest: str, actual: str) -> DigestMismatch:
        return DigestMismatch(
            f"blob sha256:{digest} is altered on disk (its bytes hash to sha256:{actual}); "
            "restore it from a copy or remove what references it",
            expected=digest,
            actual=actual,
        )

    def check(self, digest: str) -> str | None:
        """Hash the blob again; return None when intact, else a one-line problem."""
        try:
            self.path_verified(digest)
        except ChecksumMismatch as error:
            return str(error)
        return None

    def _not_regular(self, digest: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"blob sha256:{digest} in the store {self.root} is not a regular file (a FIFO, device, directory "
            "or symbolic link); remove it and restore the blob from a copy"
        )

    def path_verified(self, digest: str) -> Path:
        """The blob's path, after checking that its bytes still hash to ``digest``."""
        path = self.path_for(digest)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise self._missing(digest) from None
        except NotRegularFile:
            raise self._not_regular(digest) from None
        if actual != digest:
            raise self._altered(digest, actual)
        return path

    def open_verified(self, digest: str) -> bytes:
        """The blob's bytes, after checking that they still hash to ``digest``."""
        path = self.path_for(digest)
        try:
            with open_regular(path) as handle:
                data = handle.read()
        except FileNotFoundError:
            raise self._missing(digest) from None
        except NotRegularFile:
            raise self._not_regular(digest) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise self._altered(digest, actual)
        return data

    # -- listing and removal (gc) ---------------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[str, BlobInfo]]:
        """Every blob with its size and age, by digest."""
        for digest in self.iter_digests():
            info = self.stat(digest)
            if info is not None:
                yield digest, info

    def stale_temporaries(self, cutoff: float) -> list[str]:
        """Temp files last written before ``cutoff`` (what gc may remove: see ``remove_temporary``)."""
        stale = []
        for temp in self.iter_temp_files():
            try:
                if temp.stat().st_mtime <= cutoff:
                    stale.append(str(temp))
            except FileNotFoundError:
                continue
        return stale

    def remove_temporary(self, name: str) -> bool:
        """Remove a stale temp file unless a live writer still holds it; True if removed."""
        return self.remove_abandoned_temp(Path(name))

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

    def remove_abandoned_temp(self, temp: Path) -> bool:
        """Remove a temp file if no live writer holds it (its lock can be taken); True if removed."""
        try:
            fd = os.open(temp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            if not _try_lock(fd):
                return False  # a write in flight
            temp.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def iter_temp_files(self) -> Iterator[Path]:
        if not self.blobs_dir.is_dir():
            return
        yield from sorted(self.blobs_dir.glob(TEMP_PREFIX + "*"))
        yield from sorted(self.blobs_dir.glob(f"??/{TEMP_PREFIX}*"))

    def remove(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)
