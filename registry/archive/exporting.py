"""Writing the experts and compositions a user names, with their blobs, as one tar archive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.errors import ChecksumMismatch, ExpertNotFound, UsageError
from atmoe.registry.archive.layout import BLOB_PREFIX, FORMAT, FORMAT_VERSION, MANIFEST
from atmoe.registry.archive.manifest import composition_row, expert_row
from atmoe.registry.names import parse_ref

if TYPE_CHECKING:
    from atmoe.registry.models import Composition, Expert
    from atmoe.registry.registry import Registry


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
        expert_rows = [expert_row(e) for e in experts]
        composition_rows = [composition_row(session, c) for c in compositions]
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
            raise ChecksumMismatch(
                f"blob sha256:{digest} is missing from the store {registry.store.location}"
            ) from None
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
                with registry.store.open_stream(digest) as handle:
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
