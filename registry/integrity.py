"""Integrity of the store: ``verify`` re-hashes blobs against the catalog, ``gc`` removes blobs no row
references and stale temp files (a dry run unless asked).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.errors import UsageError
from atmoe.registry.experts import get_expert, list_experts
from atmoe.registry.models import Composition, ExpertFile, Router

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry


# -- verify --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One bad blob: who references it, under which path, and what is wrong."""

    kind: str  # "expert" or "router"
    ref: str  # name@version, or composition@version:router
    path: str | None
    digest: str
    problem: str

    def __str__(self) -> str:
        where = f"{self.ref} {self.path}" if self.path else self.ref
        return f"{where}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    experts: int = 0
    routers: int = 0
    blobs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "experts": self.experts,
            "routers": self.routers,
            "blobs": self.blobs,
            "problems": [p.to_dict() for p in self.problems],
        }


def verify(registry: Registry, ref: str | None = None) -> VerifyReport:
    """Hash every blob of one expert (``ref``) or of the whole catalog (experts and routers)."""
    report = VerifyReport()
    results: dict[str, str | None] = {}

    def check(digest: str) -> str | None:
        if digest not in results:
            results[digest] = registry.store.check(digest)
        return results[digest]

    with registry.session() as session:
        if ref is not None:
            experts = [get_expert(session, ref)]
            routers: list[tuple[str, str]] = []
        else:
            experts = list_experts(session, with_files=True)
            routers = [
                (f"{name}@{version}:{number}", digest)
                for name, version, number, digest in session.execute(
                    select(Composition.name, Composition.version, Router.number, Router.blob_digest)
                    .join(Composition, Router.composition_id == Composition.id)
                    .order_by(Composition.name, Composition.version, Router.number)
                )
            ]
    for expert in experts:
        report.experts += 1
        for file in expert.files:
            problem = check(file.sha256)
            if problem is not None:
                report.problems.append(Problem("expert", expert.ref, file.path, file.sha256, problem))
    for router_ref, digest in routers:
        report.routers += 1
        problem = check(digest)
        if problem is not None:
            report.problems.append(Problem("router", router_ref, None, digest, problem))
    report.blobs = len(results)
    return report


# -- garbage collection ----------------------------------------------------------------------------


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    blobs: list[dict[str, Any]] = field(default_factory=list)  # {"digest", "size"}
    temp_files: list[str] = field(default_factory=list)
    kept_recent: int = 0  # unreferenced but younger than the grace period

    @property
    def bytes(self) -> int:
        return sum(b["size"] for b in self.blobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "grace_seconds": self.grace_seconds,
            "blobs": self.blobs,
            "temp_files": self.temp_files,
            "kept_recent": self.kept_recent,
            "bytes": self.bytes,
        }


def referenced_digests(session: Session) -> set[str]:
    """Every blob the catalog references: expert files and router weights."""
    digests = set(session.scalars(select(ExpertFile.sha256).distinct()))
    digests.update(session.scalars(select(Router.blob_digest).distinct()))
    return digests


def gc(registry: Registry, *, dry_run: bool = True, grace_seconds: float = 3600) -> GcReport:
    """Find (and unless ``dry_run`` remove) unreferenced blobs and stale temp files.

    Only what is older than ``grace_seconds`` goes: a blob written (or deduplicated onto, which
    touches it) by an add whose row is not committed yet is young, so it is kept. The deletion is
    the second half of the gc protocol (docs/ARCHITECTURE.md): under the blob lock, taken
    exclusively in a write transaction, the references are read again from the committed rows and
    each candidate's age is checked again before it is removed; a writer commits rows only while
    it holds that lock shared and after it has checked that its blobs are in the store.
    """
    if grace_seconds < 0:
        raise UsageError(f"--grace must be >= 0 seconds, not {grace_seconds}")
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    if not dry_run:
        from atmoe.registry import roles

        with registry.session() as session:
            roles.require(session, "run gc --apply")
        registry.check_store_is_ours()
    store = registry.store
    cutoff = store.now() - grace_seconds  # the store's clock: an object store's, not this machine's
    with registry.session() as session:
        referenced = referenced_digests(session)
    for digest, info in store.iter_blobs():
        if digest in referenced:
            continue
        if info.mtime > cutoff:
            report.kept_recent += 1
            continue
        report.blobs.append({"digest": digest, "size": info.size})
    report.temp_files = store.stale_temporaries(cutoff)
    if not dry_run:
        report.blobs, report.temp_files = _remove_unreferenced(
            registry, report.blobs, report.temp_files, cutoff, grace_seconds
        )
    return report


def _remove_unreferenced(
    registry: Registry, candidates: list[dict[str, Any]], temp_files: list[str], cutoff: float, grace: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove the candidates that are still unreferenced and old, under the exclusive blob lock, and
    the abandoned temp files; returns those removed, logged as one ``gc`` event.

    On PostgreSQL the catalog's identity row is locked FOR UPDATE first, a privilege only admins
    hold (``roles.py``): the database itself refuses a writer's gc before any blob goes."""
    from atmoe.registry import events
    from atmoe.registry.db import lock_blobs
    from atmoe.registry.models import CatalogIdentity

    store = registry.store
    removed: list[dict[str, Any]] = []
    with registry.write() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(CatalogIdentity.id).with_for_update())
        lock_blobs(session, exclusive=True)
        referenced = referenced_digests(session)  # read again: rows committed since the first look count
        for blob in candidates:
            digest = blob["digest"]
            info = store.stat(digest)
            if info is None:
                continue
            if digest in referenced or info.mtime > cutoff:  # referenced, or touched by a writer since
                continue
            store.remove(digest)
            removed.append(blob)
        # a temp file a live writer still holds (its lock) is a write in flight, whatever --grace says
        temps = [temp for temp in temp_files if store.remove_temporary(temp)]
        details = {"blobs": len(removed), "bytes": sum(blob["size"] for blob in removed), "temp_files": len(temps),
                   "grace_seconds": grace}  # fmt: skip
        events.record(session, "gc", store.location, details)
    return removed, temps
