"""Importing an archive: everything checked first (reading, manifest), then the blobs stored and the
rows inserted in one transaction.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.errors import ChecksumMismatch, InvalidArchive, UsageError
from atmoe.registry import events, roles
from atmoe.registry.archive.layout import DEFAULT_MAX_MEMBER_SIZE, DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_SIZE
from atmoe.registry.archive.manifest import PlannedExpert, check_manifest
from atmoe.registry.archive.reading import read_members

if TYPE_CHECKING:
    from atmoe.registry.models import Expert
    from atmoe.registry.registry import Registry


# -- import: writing -------------------------------------------------------------------------------------


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


def import_archive(
    registry: Registry,
    path: str | os.PathLike[str],
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_member_size: int = DEFAULT_MAX_MEMBER_SIZE,
    max_total_size: int = DEFAULT_MAX_TOTAL_SIZE,
    dry_run: bool = False,
) -> ImportReport:
    """Check all of ``path`` first, then store its blobs and insert its rows (see the module doc).

    Only the blobs that the archive's rows reference are stored: members nothing references (a
    padded archive) are checked and dropped, never written to the store."""
    archive = Path(path)
    if max_members < 1 or max_member_size < 0 or max_total_size < 0:
        raise UsageError("--max-members must be >= 1, --max-member-size and --max-total-size >= 0")
    if not archive.is_file():
        raise InvalidArchive(f"{archive}: no such file")
    report = ImportReport(path=str(archive), dry_run=dry_run)
    with tempfile.TemporaryDirectory(prefix="atmoe-import-") as temp:
        staging = Path(temp) / "blobs"
        work = Path(temp) / "experts"
        staging.mkdir()
        work.mkdir()
        staged = read_members(
            archive, staging, max_members=max_members, max_member_size=max_member_size, max_total_size=max_total_size
        )
        groups, experts, compositions = check_manifest(staged, archive, work)
        referenced = {sha for planned in experts for _, sha, _ in planned.files}
        referenced |= {r["blob_digest"] for c in compositions for r in c.get("routers", [])}
        wanted = {digest: staged_path for digest, staged_path in staged.blobs.items() if digest in referenced}
        report.blobs = len(wanted)
        if dry_run:
            report.experts_added = [f"{p.row['name']}@{p.row['version']}" for p in experts]
            report.compositions_added = [f"{c['name']}@{c['version']}" for c in compositions]
            return report
        with registry.session() as session:  # a reader's import stores no blob
            roles.require(session, "import archives")
        # blobs first (the store hashes them again); rows only once every blob is in place
        for digest, staged_path in sorted(wanted.items()):
            stored = registry.store.put_file(staged_path)
            if stored.digest != digest:  # pragma: no cover - the staging area changed under us
                raise ChecksumMismatch(f"staged blob sha256:{digest} changed while it was imported")

        def work_rows(session: Session) -> ImportReport:
            result = ImportReport(path=str(archive), blobs=len(wanted))
            _insert(session, groups, experts, compositions, result)
            added = {key: value for key, value in result.to_dict().items()
                     if key.endswith(("_added", "_set")) and value}  # fmt: skip
            if added:
                events.record(session, "import", archive.name, added)
            return result

        rewrite = {digest: _rewriter(registry, path) for digest, path in wanted.items()}
        return registry.transact(work_rows, blobs=rewrite)


def _rewriter(registry: Registry, path: Path) -> Any:
    return lambda: registry.store.put_file(path)


def _insert(
    session: Session,
    groups: dict[str, str | None],
    experts: Iterable[PlannedExpert],
    compositions: Iterable[dict[str, Any]],
    report: ImportReport,
) -> None:
    from atmoe.registry import compositions as composition_service
    from atmoe.registry.experts import current_user, insert_expert
    from atmoe.registry.models import Expert, Group, Router, RouterAlias
    from atmoe.registry.routers import record_router

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
        expert = insert_expert(
            session,
            name=row["name"],
            group=group_rows[row["group"]],
            info=info,
            digest=row["digest"],
            files=planned.files,
            domain=row.get("domain") or None,
            style=row.get("style") or None,
            tags=row["tags"],
            description=row.get("description"),
            base_model=row.get("base_model"),
            base_revision=row.get("base_revision"),
            created_by=row.get("created_by") or current_user(),
            source=row.get("source"),
            created_at=row.get("created_at"),
        )
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
                router = record_router(
                    session,
                    composition,
                    blob_digest=router_row["blob_digest"],
                    data_digest=router_row.get("data_digest"),
                    eval_data_digest=router_row.get("eval_data_digest"),
                    hyperparameters=dict(router_row.get("hyperparameters") or {}),
                    metrics=dict(router_row.get("metrics") or {}),
                    library_versions=dict(router_row.get("library_versions") or {}),
                    created_by=router_row.get("created_by") or current_user(),
                    notes=router_row.get("notes"),
                    created_at=router_row.get("created_at"),
                )
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
