"""Export and import of a catalog subset as one tar archive (``atmoe-reg export`` / ``import``).

An archive holds ``manifest.json`` (the rows, as JSON, and the sha256 and size of every other member)
followed by ``blobs/sha256/<digest>``, one member per blob. It may be gzip-compressed.

Import trusts nothing in the file and writes nothing to the catalog until all of it has passed:

1. member headers, read one by one (never ``extractall``): only regular files named ``manifest.json``
   or ``blobs/sha256/<64 hex>``; absolute paths, ``..`` components, links, devices, duplicates,
   more than ``max_members`` members or a member above ``max_member_size`` bytes are refused;
2. every blob is streamed into a private staging directory outside the catalog while it is hashed;
   its sha256 must equal its name and the manifest's entry;
3. the manifest is checked field by field; each expert's files are laid out in a staging directory
   and run through ``validate.validate_adapter`` (config, shapes, NaN/Inf), and their content digest
   must equal the expert's; router blobs must be safetensors files; compositions may only pin
   experts of the archive, with their digests.

Only then are the blobs stored (the store hashes them again) and the rows inserted in one
transaction: an expert whose name and content digest already exist is reused, new content under a
known name becomes that name's next version; a composition whose spec (re-computed with the
target's versions) already exists is reused, and so is a router with the same weights.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.config import AtmoeConfig
from atmoe.errors import ChecksumMismatch, ExpertNotFound, InvalidAdapter, InvalidArchive, UsageError
from atmoe.registry.names import parse_ref, validate_name

if TYPE_CHECKING:
    from atmoe.registry.models import Composition, Expert
    from atmoe.registry.registry import Registry

FORMAT = "atmoe-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BLOB_PREFIX = "blobs/sha256/"
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_MAX_MEMBER_SIZE = 4 << 30  # 4 GiB
MAX_MANIFEST_BYTES = 256 << 20
CHUNK = 1 << 20
_BLOB_MEMBER = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")


# -- export ----------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    path: str
    experts: list[str] = field(default_factory=list)
    compositions: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


# the expert fields an archive carries (the manifest format); the rest is re-derived on import
MANIFEST_EXPERT_KEYS = (
    "name", "version", "group", "domain", "style", "tags", "description", "base_model", "base_revision",
    "digest", "created_at", "created_by", "source", "files",
)  # fmt: skip


def _expert_row(expert: Expert) -> dict[str, Any]:
    from atmoe.registry.experts import expert_record

    record = expert_record(expert)
    return {key: record[key] for key in MANIFEST_EXPERT_KEYS}


def _composition_row(session: Session, composition: Composition) -> dict[str, Any]:
    from atmoe.registry.compositions import composition_config
    from atmoe.registry.models import Router, RouterAlias

    routers = list(
        session.scalars(select(Router).where(Router.composition_id == composition.id).order_by(Router.number))
    )
    aliases: dict[int, list[str]] = {}
    for alias in session.scalars(
        select(RouterAlias).where(RouterAlias.router_id.in_([r.id for r in routers])).order_by(RouterAlias.alias)
    ):
        aliases.setdefault(alias.router_id, []).append(alias.alias)
    general = composition.general_expert
    return {
        "name": composition.name,
        "version": composition.version,
        "base_model": composition.base_model,
        "base_revision": composition.base_revision,
        "groups": list(composition.groups),
        **composition_config(composition).to_columns(),
        "description": composition.description,
        "created_at": _iso(composition.created_at),
        "created_by": composition.created_by,
        "general": {"name": general.name, "version": general.version, "digest": general.digest} if general else None,
        "members": [
            {
                "group": m.group_name,
                "slot": m.slot,
                "name": m.expert.name,
                "version": m.expert.version,
                "digest": m.digest,
            }
            for m in sorted(composition.members, key=lambda m: (m.group_index, m.slot))
        ],
        "routers": [
            {
                "number": r.number,
                "blob_digest": r.blob_digest,
                "data_digest": r.data_digest,
                "eval_data_digest": r.eval_data_digest,
                "hyperparameters": dict(r.hyperparameters or {}),
                "metrics": dict(r.metrics or {}),
                "library_versions": dict(r.library_versions or {}),
                "created_at": _iso(r.created_at),
                "created_by": r.created_by,
                "notes": r.notes,
                "aliases": aliases.get(r.id, []),
            }
            for r in routers
        ],
    }


def _select_rows(session: Session, refs: Sequence[str], everything: bool) -> tuple[list[Expert], list[Composition]]:
    """Experts and compositions that ``refs`` name (a bare NAME: every version), plus pinned experts."""
    from atmoe.registry.compositions import get_composition
    from atmoe.registry.experts import get_expert
    from atmoe.registry.models import Composition, Expert

    experts: dict[int, Expert] = {}
    compositions: dict[int, Composition] = {}
    if everything:
        experts.update((e.id, e) for e in session.scalars(select(Expert)))
        compositions.update((c.id, c) for c in session.scalars(select(Composition)))
    for text in refs:
        ref = parse_ref(text)
        if ref.router is not None:
            raise UsageError(f"{text!r}: export takes NAME or NAME@VERSION; a composition's routers all go with it")
        found = False
        if ref.version is None and "@" not in text:
            for expert in session.scalars(select(Expert).where(Expert.name == ref.name)):
                experts[expert.id] = expert
                found = True
            for composition in session.scalars(select(Composition).where(Composition.name == ref.name)):
                compositions[composition.id] = composition
                found = True
        else:
            for lookup, target in ((get_expert, experts), (get_composition, compositions)):
                try:
                    row = lookup(session, ref)
                except (ExpertNotFound, KeyError):
                    continue
                target[row.id] = row
                found = True
        if not found:
            raise ExpertNotFound(f"{text!r} names no expert and no composition; see atmoe-reg list / compositions")
    for composition in compositions.values():  # a composition travels with the experts it pins
        for member in composition.members:
            experts[member.expert.id] = member.expert
        if composition.general_expert is not None:
            experts[composition.general_expert.id] = composition.general_expert
    ordered_experts = sorted(experts.values(), key=lambda e: (e.name, e.version))
    ordered_compositions = sorted(compositions.values(), key=lambda c: (c.name, c.version))
    return ordered_experts, ordered_compositions


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing it, so a blob altered on disk is caught as it is exported."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.hasher.update(data)
        return data


def export_archive(
    registry: Registry, refs: Sequence[str], out: str | os.PathLike[str], *, everything: bool = False
) -> ExportReport:
    """Write the experts and compositions ``refs`` name (with their blobs) to ``out`` (.tar, .tar.gz)."""
    from atmoe.registry import db

    if not refs and not everything:
        raise UsageError("name what to export (NAME or NAME@VERSION, experts or compositions), or pass --all")
    out_path = Path(out)
    compress = out_path.name.endswith((".gz", ".tgz"))
    with registry.session() as session:
        experts, compositions = _select_rows(session, refs, everything)
        expert_rows = [_expert_row(e) for e in experts]
        composition_rows = [_composition_row(session, c) for c in compositions]
        groups = {e.group.name: e.group.description for e in experts}
    digests: dict[str, int] = {}
    for row in expert_rows:
        for file in row["files"]:
            digests[file["sha256"]] = file["size"]
    for row in composition_rows:
        for router in row["routers"]:
            digests.setdefault(router["blob_digest"], -1)
    for digest, size in list(digests.items()):
        try:
            actual = registry.store.size(digest)
        except FileNotFoundError:
            raise ChecksumMismatch(f"blob sha256:{digest} is missing from the store {registry.store.root}") from None
        if size not in (-1, actual):
            raise ChecksumMismatch(f"blob sha256:{digest} has {actual} bytes in the store, the catalog says {size}")
        digests[digest] = actual
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema": db.HEAD,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "groups": [{"name": name, "description": groups[name]} for name in sorted(groups)],
        "experts": expert_rows,
        "compositions": composition_rows,
        "members": {BLOB_PREFIX + digest: {"sha256": digest, "size": size} for digest, size in sorted(digests.items())},
    }
    report = ExportReport(
        path=str(out_path),
        experts=[f"{r['name']}@{r['version']}" for r in expert_rows],
        compositions=[f"{r['name']}@{r['version']}" for r in composition_rows],
        routers=[f"{r['name']}@{r['version']}:{x['number']}" for r in composition_rows for x in r["routers"]],
        blobs=len(digests),
        bytes=sum(digests.values()),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        with tarfile.open(temp_name, "w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
            tar.addfile(_tarinfo(MANIFEST, len(data)), io.BytesIO(data))
            for digest, size in sorted(digests.items()):
                with open(registry.store.path_for(digest), "rb") as handle:
                    reader = _HashingReader(handle)
                    tar.addfile(_tarinfo(BLOB_PREFIX + digest, size), reader)
                actual = reader.hasher.hexdigest()
                if actual != digest:
                    raise ChecksumMismatch(
                        f"blob sha256:{digest} is altered on disk (its bytes hash to sha256:{actual}); "
                        "run atmoe-reg verify"
                    )
        with open(temp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_name, out_path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return report


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0  # the same catalog exports to the same bytes (uncompressed)
    info.uname = info.gname = ""
    return info


# -- import: reading the archive safely ----------------------------------------------------------------


@dataclass
class ImportReport:
    path: str
    experts_added: list[str] = field(default_factory=list)
    experts_existing: list[str] = field(default_factory=list)
    compositions_added: list[str] = field(default_factory=list)
    compositions_existing: list[str] = field(default_factory=list)
    routers_added: list[str] = field(default_factory=list)
    routers_existing: list[str] = field(default_factory=list)
    aliases_set: list[str] = field(default_factory=list)
    blobs: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _bad(path: Path | str, problem: str) -> InvalidArchive:
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
    if name != MANIFEST and not _BLOB_MEMBER.match(name):
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
class _Staged:
    manifest: dict[str, Any]
    blobs: dict[str, Path]  # digest -> staged file


def _read_members(path: Path, staging: Path, *, max_members: int, max_member_size: int) -> _Staged:
    manifest_bytes: bytes | None = None
    blobs: dict[str, Path] = {}
    seen: set[str] = set()
    try:
        tar = tarfile.open(path, "r:*")
    except _CORRUPT as error:
        raise _bad(path, f"not a readable tar archive ({error})") from None
    with tar:
        count = 0
        try:
            for member in tar:  # headers one at a time: the limits stop a huge archive early
                count += 1
                if count > max_members:
                    raise _bad(path, f"more than {max_members} members (--max-members)")
                name = check_member_header(member, max_member_size=max_member_size)
                if name in seen:
                    raise _bad(path, f"member {name!r} appears twice")
                seen.add(name)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - regular files always have a reader
                    raise _bad(path, f"member {name!r} cannot be read")
                if name == MANIFEST:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise _bad(path, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
                    buffer = io.BytesIO()
                    _, total = _stream(source, buffer)
                    manifest_bytes = buffer.getvalue()
                    if total != member.size:
                        raise _bad(path, f"{MANIFEST} is truncated")
                    continue
                digest = name.rsplit("/", 1)[1]
                target = staging / digest
                with open(target, "wb") as sink:
                    actual, total = _stream(source, sink)
                if total != member.size:
                    raise _bad(path, f"member {name!r} is truncated ({total} of {member.size} bytes)")
                if actual != digest:
                    raise _bad(path, f"member {name!r} is altered: its bytes hash to sha256:{actual}")
                blobs[digest] = target
        except _CORRUPT as error:
            raise _bad(path, f"corrupt or truncated archive ({one_line(error)})") from None
    if manifest_bytes is None:
        raise _bad(path, f"no {MANIFEST}: not an atmoe-reg archive")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _bad(path, f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise _bad(path, f"{MANIFEST} is not a JSON object")
    return _Staged(manifest=manifest, blobs=blobs)


# -- import: checking the manifest -------------------------------------------------------------------


class _Check:
    """Typed access to manifest fields; every problem is one InvalidArchive line naming the field."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive

    def fail(self, where: str, problem: str) -> InvalidArchive:
        return _bad(self.archive, f"{MANIFEST}: {where}: {problem}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be an object")
        return value

    def lst(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "must be a list")
        return value

    def string(self, value: Any, where: str, *, optional: bool = False, limit: int = 1 << 16) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > limit:
            raise self.fail(where, f"must be a string of at most {limit} characters")
        return value

    def integer(self, value: Any, where: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"must be an integer >= {minimum}, not {value!r}")
        return value

    def number(self, value: Any, where: str) -> float:
        import math

        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"must be a finite number, not {value!r}")
        return float(value)

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {value!r}")
        return value

    def name(self, value: Any, where: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"{what} must be a string")
        try:
            return validate_name(value, what)
        except UsageError as error:
            raise self.fail(where, str(error)) from None

    def digest(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise self.fail(where, f"not a sha256 digest: {value!r}")
        return value

    def moment(self, value: Any, where: str) -> datetime | None:
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(self.string(value, where, limit=64) or "")
        except ValueError:
            raise self.fail(where, f"not an ISO time: {value!r}") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    def plain(self, value: Any, where: str) -> dict[str, Any]:
        """A JSON object of plain data (hyperparameters, metrics, ...)."""
        return self.obj(value if value is not None else {}, where)


@dataclass
class _PlannedExpert:
    row: dict[str, Any]
    info: Any  # validate.AdapterInfo
    files: list[tuple[str, str, int]]  # (path, sha256, size)


def _check_manifest(
    staged: _Staged, archive: Path, work: Path
) -> tuple[dict[str, str | None], list[_PlannedExpert], list[dict[str, Any]]]:
    from atmoe.registry.experts import _check_tags, content_digest
    from atmoe.registry.validate import read_safetensors_header, validate_adapter

    c = _Check(archive)
    manifest = staged.manifest
    if manifest.get("format") != FORMAT:
        raise _bad(archive, f"{MANIFEST}: format is {manifest.get('format')!r}, not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _bad(
            archive,
            f"{MANIFEST}: format_version {manifest.get('format_version')!r} is unknown to this atmoe-reg "
            f"(it reads {FORMAT_VERSION}): upgrade atmoe-registry",
        )
    members = c.obj(manifest.get("members"), "members")
    for name, entry in members.items():
        match = _BLOB_MEMBER.match(name) if isinstance(name, str) else None
        if match is None:
            raise c.fail("members", f"unexpected member name {name!r}")
        entry = c.obj(entry, f"members[{name!r}]")
        if c.digest(entry.get("sha256"), f"members[{name!r}].sha256") != match[1]:
            raise c.fail(f"members[{name!r}]", "sha256 differs from the member's name")
        if match[1] not in staged.blobs:
            raise c.fail(f"members[{name!r}]", "is listed but not in the archive")
        size = c.integer(entry.get("size"), f"members[{name!r}].size")
        if staged.blobs[match[1]].stat().st_size != size:
            raise c.fail(f"members[{name!r}]", f"the member's size differs from the manifest's {size}")
    listed = {name.rsplit("/", 1)[1] for name in members}
    unlisted = sorted(set(staged.blobs) - listed)
    if unlisted:
        raise c.fail("members", f"the archive holds {BLOB_PREFIX}{unlisted[0]}, which the manifest does not list")

    groups: dict[str, str | None] = {}
    for i, row in enumerate(c.lst(manifest.get("groups", []), "groups")):
        row = c.obj(row, f"groups[{i}]")
        groups[c.name(row.get("name"), f"groups[{i}].name", "group")] = c.string(
            row.get("description"), f"groups[{i}].description", optional=True
        )

    experts: list[_PlannedExpert] = []
    seen: dict[tuple[str, int], str] = {}
    for i, row in enumerate(c.lst(manifest.get("experts", []), "experts")):
        where = f"experts[{i}]"
        row = c.obj(row, where)
        name = c.name(row.get("name"), f"{where}.name", "expert name")
        version = c.integer(row.get("version"), f"{where}.version", minimum=1)
        label = f"{name}@{version}"
        if (name, version) in seen:
            raise c.fail(where, f"{label} appears twice")
        group = c.name(row.get("group"), f"{where}.group", "group")
        groups.setdefault(group, None)
        for key in ("domain", "style"):
            if row.get(key) not in (None, ""):
                c.name(row.get(key), f"{where}.{key}", key)
        try:
            row["tags"] = _check_tags(c.plain(row.get("tags"), f"{where}.tags"))
        except UsageError as error:
            raise c.fail(where, str(error)) from None
        for key in ("description", "base_model", "base_revision", "created_by", "source"):
            c.string(row.get(key), f"{where}.{key}", optional=True)
        row["created_at"] = c.moment(row.get("created_at"), f"{where}.created_at")
        digest = c.digest(row.get("digest"), f"{where}.digest")
        files: list[tuple[str, str, int]] = []
        paths: set[str] = set()
        for j, entry in enumerate(c.lst(row.get("files"), f"{where}.files")):
            entry = c.obj(entry, f"{where}.files[{j}]")
            path = c.string(entry.get("path"), f"{where}.files[{j}].path", limit=255) or ""
            if not _FILE_NAME.match(path) or path in paths:
                raise c.fail(f"{where}.files[{j}]", f"file name {path!r} is not a plain, unique file name")
            paths.add(path)
            sha = c.digest(entry.get("sha256"), f"{where}.files[{j}].sha256")
            if sha not in staged.blobs:
                raise c.fail(f"{where}.files[{j}]", f"blob sha256:{sha} is not in the archive")
            size = c.integer(entry.get("size"), f"{where}.files[{j}].size")
            if staged.blobs[sha].stat().st_size != size:
                raise c.fail(f"{where}.files[{j}]", f"size {size} differs from the blob's")
            files.append((path, sha, size))
        if content_digest((p, s) for p, s, _ in files) != digest:
            raise c.fail(where, f"{label}: the content digest does not match its files")
        # the expert's files, laid out as an adapter directory, go through add-expert's validation
        adapter_dir = work / f"expert-{i}"
        adapter_dir.mkdir()
        for path, sha, _ in files:
            try:
                os.link(staged.blobs[sha], adapter_dir / path)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(staged.blobs[sha], adapter_dir / path)
        try:
            info = validate_adapter(adapter_dir, check_values=True)
        except InvalidAdapter as error:
            raise _bad(archive, f"expert {label}: {error}") from None
        seen[(name, version)] = digest
        experts.append(_PlannedExpert(row=row, info=info, files=files))

    compositions: list[dict[str, Any]] = []
    seen_compositions: set[tuple[str, int]] = set()
    for i, row in enumerate(c.lst(manifest.get("compositions", []), "compositions")):
        where = f"compositions[{i}]"
        row = c.obj(row, where)
        name = c.name(row.get("name"), f"{where}.name", "composition name")
        version = c.integer(row.get("version"), f"{where}.version", minimum=1)
        if (name, version) in seen_compositions:
            raise c.fail(where, f"{name}@{version} appears twice")
        seen_compositions.add((name, version))
        group_names = [c.name(g, f"{where}.groups", "group") for g in c.lst(row.get("groups"), f"{where}.groups")]
        if not group_names or len(set(group_names)) != len(group_names):
            raise c.fail(f"{where}.groups", "must list distinct groups")
        for key in ("base_model", "base_revision", "description", "created_by"):
            c.string(row.get(key), f"{where}.{key}", optional=True)
        row["created_at"] = c.moment(row.get("created_at"), f"{where}.created_at")
        c.number(row.get("lam"), f"{where}.lam")
        c.number(row.get("temperature"), f"{where}.temperature")
        c.flag(row.get("learn_lambda"), f"{where}.learn_lambda")
        c.plain(row.get("options"), f"{where}.options")
        try:  # the one definition of what a composition's settings may be
            row["config"] = AtmoeConfig.from_columns(row, general=row.get("general") is not None)
        except UsageError as error:
            raise c.fail(where, str(error)) from None

        def pinned(entry: Any, at: str) -> tuple[str, int]:
            entry = c.obj(entry, at)
            key = (
                c.name(entry.get("name"), f"{at}.name", "expert name"),
                c.integer(entry.get("version"), f"{at}.version", minimum=1),
            )
            if key not in seen:
                raise c.fail(at, f"pins {key[0]}@{key[1]}, which the archive does not hold")
            if c.digest(entry.get("digest"), f"{at}.digest") != seen[key]:
                raise c.fail(at, f"the digest pinned for {key[0]}@{key[1]} differs from the expert's")
            return key

        slots: dict[str, list[int]] = {g: [] for g in group_names}
        member_keys: list[tuple[str, int]] = []
        for j, entry in enumerate(c.lst(row.get("members"), f"{where}.members")):
            at = f"{where}.members[{j}]"
            member_keys.append(pinned(entry, at))
            group = c.name(entry.get("group"), f"{at}.group", "group")
            if group not in slots:
                raise c.fail(at, f"group {group!r} is not one of the composition's groups")
            slots[group].append(c.integer(entry.get("slot"), f"{at}.slot"))
        for group, group_slots in slots.items():
            if sorted(group_slots) != list(range(len(group_slots))) or not group_slots:
                raise c.fail(where, f"group {group!r} has slots {group_slots}, expected 0..n-1")
        if len({k[0] for k in member_keys}) != len(member_keys):
            raise c.fail(where, "pins one expert name twice")
        if row.get("general") is not None:
            pinned(row.get("general"), f"{where}.general")
        numbers: set[int] = set()
        for j, router in enumerate(c.lst(row.get("routers", []), f"{where}.routers")):
            at = f"{where}.routers[{j}]"
            router = c.obj(router, at)
            number = c.integer(router.get("number"), f"{at}.number", minimum=1)
            if number in numbers:
                raise c.fail(at, f"router {number} appears twice")
            numbers.add(number)
            blob = c.digest(router.get("blob_digest"), f"{at}.blob_digest")
            if blob not in staged.blobs:
                raise c.fail(at, f"router blob sha256:{blob} is not in the archive")
            try:
                read_safetensors_header(staged.blobs[blob])
            except InvalidAdapter as error:
                raise c.fail(at, f"router weights are not a safetensors file ({error})") from None
            for key in ("data_digest", "eval_data_digest"):
                if router.get(key) is not None:
                    c.digest(router.get(key), f"{at}.{key}")
            for key in ("hyperparameters", "metrics", "library_versions"):
                c.plain(router.get(key), f"{at}.{key}")
            c.string(router.get("created_by"), f"{at}.created_by", optional=True)
            c.string(router.get("notes"), f"{at}.notes", optional=True)
            router["created_at"] = c.moment(router.get("created_at"), f"{at}.created_at")
            for k, alias in enumerate(c.lst(router.get("aliases", []), f"{at}.aliases")):
                c.name(alias, f"{at}.aliases[{k}]", "alias")
        compositions.append(row)
    return groups, experts, compositions


# -- import: writing -------------------------------------------------------------------------------------


def import_archive(
    registry: Registry,
    path: str | os.PathLike[str],
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    dry_run: bool = False,
) -> ImportReport:
    """Check all of ``path`` first, then store its blobs and insert its rows (see the module doc)."""
    archive = Path(path)
    if max_members < 1 or max_member_size < 0:
        raise UsageError("--max-members must be >= 1 and --max-member-size >= 0")
    if not archive.is_file():
        raise InvalidArchive(f"{archive}: no such file")
    report = ImportReport(path=str(archive), dry_run=dry_run)
    with tempfile.TemporaryDirectory(prefix="atmoe-import-") as temp:
        staging = Path(temp) / "blobs"
        work = Path(temp) / "experts"
        staging.mkdir()
        work.mkdir()
        staged = _read_members(archive, staging, max_members=max_members, max_member_size=max_member_size)
        groups, experts, compositions = _check_manifest(staged, archive, work)
        report.blobs = len(staged.blobs)
        if dry_run:
            report.experts_added = [f"{p.row['name']}@{p.row['version']}" for p in experts]
            report.compositions_added = [f"{c['name']}@{c['version']}" for c in compositions]
            return report
        # blobs first (the store hashes them again); rows only once every blob is in place
        for digest, staged_path in sorted(staged.blobs.items()):
            stored = registry.store.put_file(staged_path)
            if stored.digest != digest:  # pragma: no cover - the staging area changed under us
                raise ChecksumMismatch(f"staged blob sha256:{digest} changed while it was imported")

        def work_rows(session: Session) -> ImportReport:
            result = ImportReport(path=str(archive), blobs=len(staged.blobs))
            _insert(session, groups, experts, compositions, result)
            return result

        return registry.transact(work_rows)


def _insert(
    session: Session,
    groups: dict[str, str | None],
    experts: Iterable[_PlannedExpert],
    compositions: Iterable[dict[str, Any]],
    report: ImportReport,
) -> None:
    from atmoe.registry import compositions as composition_service
    from atmoe.registry.db import next_value
    from atmoe.registry.experts import adapter_columns, current_user
    from atmoe.registry.models import Expert, ExpertFile, Group, Router, RouterAlias

    group_rows = {g.name: g for g in session.scalars(select(Group))}
    for name, description in groups.items():
        if name not in group_rows:
            group_rows[name] = Group(name=name, description=description)
            session.add(group_rows[name])
    session.flush()

    by_key: dict[tuple[str, int], Expert] = {}
    for planned in experts:
        row, info = planned.row, planned.info
        label = f"{row['name']}@{row['version']}"
        existing = session.scalar(select(Expert).where(Expert.name == row["name"], Expert.digest == row["digest"]))
        if existing is not None:
            by_key[(row["name"], row["version"])] = existing
            report.experts_existing.append(f"{label} -> {existing.ref}")
            continue
        expert = Expert(
            name=row["name"],
            version=next_value(session, Expert.version, Expert.name == row["name"]),
            group=group_rows[row["group"]],
            domain=row.get("domain") or None,
            style=row.get("style") or None,
            tags=row["tags"],
            description=row.get("description"),
            base_model=row.get("base_model"),
            base_revision=row.get("base_revision"),
            **adapter_columns(info),
            digest=row["digest"],
            size=sum(size for _, _, size in planned.files),
            created_by=row.get("created_by") or current_user(),
            source=row.get("source"),
            files=[ExpertFile(path=p, sha256=s, size=n) for p, s, n in planned.files],
        )
        if row.get("created_at") is not None:
            expert.created_at = row["created_at"]
        session.add(expert)
        session.flush()
        by_key[(row["name"], row["version"])] = expert
        report.experts_added.append(f"{label} -> {expert.ref}")

    for row in compositions:
        label = f"{row['name']}@{row['version']}"
        members: dict[str, list[Expert]] = {g: [] for g in row["groups"]}
        for entry in sorted(row["members"], key=lambda m: (row["groups"].index(m["group"]), m["slot"])):
            members[entry["group"]].append(by_key[(entry["name"], entry["version"])])
        general = by_key[(row["general"]["name"], row["general"]["version"])] if row.get("general") else None
        spec = composition_service.ComposeSpec(
            name=row["name"],
            groups=tuple(row["groups"]),
            config=row["config"],
            general=general.ref if general is not None else None,
            description=row.get("description"),
        )
        composition, created = composition_service.pin(
            session,
            spec,
            members,
            general,
            created_by=row.get("created_by") or current_user(),
            created_at=row.get("created_at"),
        )
        if created:
            report.compositions_added.append(f"{label} -> {composition.ref}")
        else:
            report.compositions_existing.append(f"{label} -> {composition.ref}")
        for router_row in sorted(row.get("routers", []), key=lambda r: r["number"]):
            router_label = f"{label}:{router_row['number']}"
            router = session.scalar(
                select(Router).where(
                    Router.composition_id == composition.id, Router.blob_digest == router_row["blob_digest"]
                )
            )
            if router is not None:
                report.routers_existing.append(f"{router_label} -> {composition.ref}:{router.number}")
            else:
                router = Router(
                    composition=composition,
                    number=next_value(session, Router.number, Router.composition_id == composition.id),
                    blob_digest=router_row["blob_digest"],
                    data_digest=router_row.get("data_digest"),
                    eval_data_digest=router_row.get("eval_data_digest"),
                    hyperparameters=dict(router_row.get("hyperparameters") or {}),
                    metrics=dict(router_row.get("metrics") or {}),
                    library_versions=dict(router_row.get("library_versions") or {}),
                    created_by=router_row.get("created_by") or current_user(),
                    notes=router_row.get("notes"),
                )
                if router_row.get("created_at") is not None:
                    router.created_at = router_row["created_at"]
                session.add(router)
                session.flush()
                report.routers_added.append(f"{router_label} -> {composition.ref}:{router.number}")
            for alias in router_row.get("aliases", []):
                taken = session.scalar(
                    select(RouterAlias).where(
                        RouterAlias.composition_name == composition.name, RouterAlias.alias == alias
                    )
                )
                if taken is None:  # an alias the target already has keeps pointing where it does
                    session.add(RouterAlias(composition_name=composition.name, alias=alias, router=router))
                    session.flush()
                    report.aliases_set.append(f"{composition.name}:{alias} -> {composition.ref}:{router.number}")
