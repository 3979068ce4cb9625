"""Reading an archive safely: member headers one by one (never ``extractall``), each blob streamed
into a private staging directory while hashed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from atmoe.errors import InvalidArchive
from atmoe.jsontext import JsonTextError, parse_json
from atmoe.registry.archive.layout import (
    BLOB_MEMBER,
    BLOB_PREFIX,
    CHUNK,
    DEFAULT_MAX_TOTAL_SIZE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_CONTAINERS,
)

# -- import: reading the archive safely ----------------------------------------------------------------


def bad(path: Path | str, problem: str) -> InvalidArchive:
    return InvalidArchive(f"{Path(path).name}: {problem}")


def check_member_header(member: tarfile.TarInfo, *, max_member_size: int) -> str:
    """Refuse a member that is not a plain, small enough file at a safe relative path; return its name."""
    name = member.name
    if not name or "\x00" in name:
        raise InvalidArchive("member with an empty name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or PurePosixPath(name).is_absolute():
        raise InvalidArchive(f"member {name!r} has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise InvalidArchive(f"member {name!r} has a '..' component")
    if member.issym() or member.islnk():
        raise InvalidArchive(f"member {name!r} is a link (to {member.linkname!r}); archives may only hold files")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise InvalidArchive(f"member {name!r} is a device or fifo; archives may only hold files")
    if not member.isreg():
        raise InvalidArchive(f"member {name!r} is not a regular file")
    if member.size > max_member_size:
        raise InvalidArchive(
            f"member {name!r} has {member.size} bytes, more than the limit of {max_member_size} (--max-member-size)"
        )
    if name != MANIFEST and not BLOB_MEMBER.match(name):
        raise InvalidArchive(f"unexpected member {name!r} (an archive holds {MANIFEST} and {BLOB_PREFIX}<sha256>)")
    return name


def _stream(source: IO[bytes], sink: IO[bytes]) -> tuple[str, int]:
    """Copy a member's bytes (the tar reader stops at the member's end) while hashing them."""
    hasher = hashlib.sha256()
    total = 0
    while chunk := source.read(CHUNK):
        total += len(chunk)
        hasher.update(chunk)
        sink.write(chunk)
    return hasher.hexdigest(), total


# what a damaged tar or gzip stream raises while it is read
_CORRUPT = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class Staged:
    manifest: dict[str, Any]
    blobs: dict[str, Path]  # digest -> staged file


def read_members(
    path: Path, staging: Path, *, max_members: int, max_member_size: int, max_total_size: int = DEFAULT_MAX_TOTAL_SIZE
) -> Staged:
    manifest_bytes: bytes | None = None
    blobs: dict[str, Path] = {}
    seen: set[str] = set()
    total_size = 0
    try:
        tar = tarfile.open(path, "r:*")
    except _CORRUPT as error:
        raise bad(path, f"not a readable tar archive ({error})") from None
    with tar:
        count = 0
        try:
            for member in tar:  # headers one at a time: the limits stop a huge archive early
                count += 1
                if count > max_members:
                    raise bad(path, f"more than {max_members} members (--max-members)")
                name = check_member_header(member, max_member_size=max_member_size)
                total_size += member.size
                if total_size > max_total_size:  # a decompression bomb stops here, before it is staged
                    raise bad(path, f"members of more than {max_total_size} bytes in all (--max-total-size)")
                if name in seen:
                    raise bad(path, f"member {name!r} appears twice")
                seen.add(name)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - regular files always have a reader
                    raise bad(path, f"member {name!r} cannot be read")
                if name == MANIFEST:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise bad(path, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
                    buffer = io.BytesIO()
                    _, total = _stream(source, buffer)
                    manifest_bytes = buffer.getvalue()
                    if total != member.size:
                        raise bad(path, f"{MANIFEST} is truncated")
                    continue
                digest = name.rsplit("/", 1)[1]
                target = staging / digest
                with open(target, "wb") as sink:
                    actual, total = _stream(source, sink)
                if total != member.size:
                    raise bad(path, f"member {name!r} is truncated ({total} of {member.size} bytes)")
                if actual != digest:
                    raise bad(path, f"member {name!r} is altered: its bytes hash to sha256:{actual}")
                blobs[digest] = target
        except _CORRUPT as error:
            raise bad(path, f"corrupt or truncated archive ({one_line(error)})") from None
    if manifest_bytes is None:
        raise bad(path, f"no {MANIFEST}: not an atmoe-reg archive")
    containers = manifest_bytes.count(b"{") + manifest_bytes.count(b"[")
    if containers > MAX_MANIFEST_CONTAINERS:
        raise bad(path, f"{MANIFEST} opens {containers} JSON objects and lists, more than {MAX_MANIFEST_CONTAINERS}")
    try:
        manifest = parse_json(manifest_bytes)
    except JsonTextError as error:
        raise bad(path, f"{MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise bad(path, f"{MANIFEST} is not a JSON object")
    return Staged(manifest=manifest, blobs=blobs)
