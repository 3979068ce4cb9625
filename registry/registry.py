"""The ``Registry`` facade: one catalog (database + blob store) and the operations the CLI uses.

A thin class: each method delegates to a service module (``experts``, later ``compositions``,
``routers``, ``build``, ``archive``) whose functions take the registry or a session.

    reg = Registry.open()                      # ATMOE_HOME / ATMOE_DB_URL / ATMOE_STORE or defaults
    expert, created = reg.add_expert("path/to/adapter", name="gastro", group="domain")
    with reg.session() as s: ...               # read; nothing is committed
    with reg.write() as s: ...                 # write; BEGIN IMMEDIATE on SQLite, commit on exit
    reg.transact(fn)                           # write(fn) retried on IntegrityError (version numbers)
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from atmoe.config import AtmoeConfig
from atmoe.errors import StoreMismatch, UsageError
from atmoe.registry import db, experts, integrity, roles
from atmoe.registry import groups as group_service
from atmoe.registry.config import Settings, resolve
from atmoe.registry.experts import current_user
from atmoe.registry.records import CompositionRecord, ExpertRecord, GroupRecord, RouterRecord
from atmoe.registry.store import BlobStore

if TYPE_CHECKING:
    from typing import TypeAlias

    from atmoe.registry.build import Built
    from atmoe.registry.events import EventRecord
    from atmoe.registry.expert_aliases import ExpertAliasRecord
    from atmoe.registry.s3store import S3Store

    Store: TypeAlias = BlobStore | S3Store
    from atmoe.registry.router_training import TrainedRouter

T = TypeVar("T")


def open_store(settings: Settings) -> Store:
    """The blob store the settings name: a directory, or an S3 bucket with its local cache."""
    if isinstance(settings.store, Path):
        return BlobStore(settings.store)
    from atmoe.registry.s3store import S3Store

    return S3Store(settings.store, settings.cache or settings.home / "cache")


class Registry:
    def __init__(self, settings: Settings, engine: Engine, store: Store) -> None:
        self.settings = settings
        self.home: Path = settings.home
        self.db_url: str = settings.db_url
        self.engine: Engine = engine
        self.store: Store = store
        self._write_engine = db.write_engine(engine)

    @classmethod
    def open(
        cls,
        home: str | os.PathLike[str] | None = None,
        db_url: str | None = None,
        store: str | os.PathLike[str] | None = None,
        *,
        check_schema: bool = True,
        warn: Callable[[str], None] | None = db.default_warn,
    ) -> Registry:
        """Open (creating if needed) the catalog.

        A blank database is created at the schema head. With ``check_schema`` (the default) an
        older schema raises SchemaMismatch ("run atmoe-reg db upgrade") and an unknown one too;
        ``check_schema=False`` opens without touching the schema (``db upgrade``, ``db current``).
        ``warn`` receives one-line warnings (a SQLite database on a network filesystem).
        """
        settings = resolve(home, db_url, store)
        settings.home.mkdir(parents=True, exist_ok=True)
        sqlite_file = db.sqlite_path(settings.db_url)
        existed = sqlite_file is None or sqlite_file.exists()
        engine = db.create_registry_engine(settings.db_url, warn=warn)
        registry = cls(settings, engine, open_store(settings))
        refused_blank = False
        try:
            registry.store.ensure()
            if check_schema:
                if db.is_blank(engine) and registry.store.holds_blobs():
                    refused_blank = True
                    raise StoreMismatch(
                        f"the database {engine.url.render_as_string(hide_password=True)} is new, but the store "
                        f"{registry.store.location} already holds blobs (of catalog "
                        f"{registry.store.catalog_id() or 'unknown'}): restore that catalog's database, point "
                        "--db at it, or use an empty --store; nothing was created"
                    )
                db.ensure_schema(engine)
                registry._adopt_store()
        except BaseException:
            engine.dispose()
            if refused_blank and not existed and sqlite_file is not None:
                # refused before any table was made: leave no empty database file behind either
                for path in (sqlite_file, sqlite_file.with_name(sqlite_file.name + "-wal"),
                             sqlite_file.with_name(sqlite_file.name + "-shm")):  # fmt: skip
                    path.unlink(missing_ok=True)
            raise
        return registry

    @functools.cached_property
    def catalog_id(self) -> str:
        """This catalog's id (recorded in its database and in its store's ``catalog-id``; it never changes)."""
        from sqlalchemy import select

        from atmoe.registry.models import CatalogIdentity

        with self.session() as session:
            return session.scalars(select(CatalogIdentity.id)).one()

    def _adopt_store(self) -> None:
        """An unmarked store (new, or from before catalog ids) becomes this catalog's."""
        if self.store.catalog_id() is None:
            self.store.mark(self.catalog_id)

    def check_store_is_ours(self) -> None:
        """Refuse (``StoreMismatch``) when the store belongs to another catalog: gc would delete
        every blob of that catalog as unreferenced."""
        theirs, ours = self.store.catalog_id(), self.catalog_id
        if theirs != ours:
            raise StoreMismatch(
                f"the store {self.store.location} belongs to catalog {theirs or 'unknown'}, not to this database's "
                f"catalog {ours}: gc --apply would delete that catalog's blobs; use the store of this catalog"
            )

    def __repr__(self) -> str:
        return f"Registry(db={self.engine.url!r}, store={self.store.location!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- sessions ------------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; objects stay usable after it closes. Nothing is committed. A database
        refusal for lack of privilege is raised as PermissionDenied (``roles.py``)."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
            except DBAPIError as error:
                refused = roles.denied(error)
                if refused is None:
                    raise
                raise refused from None

    @contextmanager
    def reader(self) -> Iterator[experts.SessionReader]:
        """A read session as a listing ``Reader`` (``listing.py``)."""
        with self.session() as session:
            yield experts.SessionReader(session)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write session: takes the write lock first on SQLite, commits on success. A database
        refusal for lack of privilege is raised as PermissionDenied, after the rollback."""
        with Session(self._write_engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException as error:
                session.rollback()
                refused = roles.denied(error)
                if refused is not None:
                    raise refused from None
                raise

    def transact(
        self,
        work: Callable[[Session], T],
        *,
        attempts: int = 10,
        blobs: Mapping[str, Callable[[], Any]] | None = None,
    ) -> T:
        """Run ``work(session)`` in a write transaction, retrying on IntegrityError.

        Version and router numbers are allocated as max + 1 under unique constraints; on
        PostgreSQL two writers may pick the same number, and the loser simply tries again, after a
        short random pause so that several losers do not collide again in lockstep.

        ``blobs`` ({digest: rewrite}) are the blobs the rows of ``work`` reference (the gc protocol,
        docs/ARCHITECTURE.md): inside the transaction, under the blob lock that gc takes
        exclusively to delete, each must be in the store; one that a gc removed since it was
        written is written again by its ``rewrite()``, and the commit comes before the lock is let go.
        """
        for attempt in range(1, attempts + 1):
            try:
                with self.write() as session:
                    if blobs:
                        db.lock_blobs(session, exclusive=False)
                        self._ensure_blobs(blobs)
                    return work(session)
            except IntegrityError:
                if attempt == attempts:
                    raise
                time.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")

    def _ensure_blobs(self, blobs: Mapping[str, Callable[[], Any]]) -> None:
        from atmoe.errors import ChecksumMismatch

        for digest, rewrite in blobs.items():
            if self.store.has(digest):
                continue
            rewrite()
            if not self.store.has(digest):
                raise ChecksumMismatch(
                    f"blob sha256:{digest} vanished from the store {self.store.location} "
                    "and could not be written again; nothing was committed"
                )

    # -- schema ----------------------------------------------------------------------------------
    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return db.current_revision(connection)

    def upgrade(self) -> tuple[str | None, str | None]:
        """Upgrade the database to the schema head; returns (before, after). On PostgreSQL the
        owner's upgrade grants the roles' privileges again (``roles.refresh``), new tables included."""
        revisions = db.upgrade(self.engine)
        roles.refresh(self)
        return revisions

    # -- experts -----------------------------------------------------------------------------------
    def add_expert(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        group: str,
        domain: str | None = None,
        style: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        base_model: str | None = None,
        base_revision: str | None = None,
        created_by: str | None = None,
        source: str | None = None,
    ) -> tuple[ExpertRecord, bool]:
        """Validate and add a PEFT LoRA directory, or an ``hf://ORG/REPO[@REVISION][/SUBFOLDER]`` string,
        as the next version of ``name``; (record, created)."""
        return experts.add_expert(
            self,
            path if isinstance(path, str) else Path(path),
            name=name,
            group=group,
            domain=domain,
            style=style,
            tags=tags,
            description=description,
            base_model=base_model,
            base_revision=base_revision,
            created_by=created_by,
            source=source,
        )

    def list_experts(
        self,
        group: str | None = None,
        domain: str | None = None,
        style: str | None = None,
        tag: str | Sequence[str] | Mapping[str, str] | None = None,
        base_model: str | None = None,
        *,
        search: str | None = None,
        with_files: bool = False,
    ) -> list[ExpertRecord]:
        """Every version, by name and version. ``search``: free text over names, descriptions, domains,
        styles and tags (``search.py``). Files are loaded only ``with_files``."""
        with self.session() as session:
            rows = experts.list_experts(
                session,
                group=group,
                domain=domain,
                style=style,
                tag=tag,
                base_model=base_model,
                search=search,
                with_files=with_files,
            )
            return [ExpertRecord.from_row(row, files=with_files) for row in rows]

    def get_expert(self, ref: str) -> ExpertRecord:
        """``NAME`` (latest), ``NAME@3``, ``NAME@latest`` or ``NAME@ALIAS``, with its files and aliases;
        raises ExpertNotFound."""
        from atmoe.registry.expert_aliases import aliases_of

        with self.session() as session:
            row = experts.get_expert(session, ref)
            aliases = tuple(alias.alias for alias in aliases_of(session, [row.id]))
            return ExpertRecord.from_row(row, aliases=aliases)

    def verify(self, ref: str | None = None) -> list[integrity.Problem]:
        """Re-hash the blobs of one expert, or of every expert and router; [] when all intact."""
        return integrity.verify(self, ref).problems

    def verify_report(self, ref: str | None = None) -> integrity.VerifyReport:
        return integrity.verify(self, ref)

    def remove_expert(self, ref: str, force: bool = False) -> list[str]:
        return experts.remove_expert(self, ref, force=force)

    # -- groups ------------------------------------------------------------------------------------
    def groups(self) -> list[GroupRecord]:
        with self.session() as session:
            return [GroupRecord(g.name, g.description) for g in group_service.list_groups(session)]

    def add_group(self, name: str, description: str | None = None) -> tuple[GroupRecord, bool]:
        group, created = group_service.add_group(self, name, description)
        return GroupRecord(group.name, group.description), created

    # -- store maintenance -------------------------------------------------------------------------
    def gc(self, dry_run: bool = True, grace_seconds: float = 3600) -> integrity.GcReport:
        return integrity.gc(self, dry_run=dry_run, grace_seconds=grace_seconds)

    def info(self) -> dict[str, Any]:
        return {
            "home": str(self.home),
            "db_url": self.engine.url.render_as_string(hide_password=True),
            "store": self.store.location,
            "revision": self.current_revision(),
            "head": db.HEAD,
        }

    # -- compositions ------------------------------------------------------------------------------
    def compose(
        self,
        *,
        name: str,
        groups: Sequence[str],
        experts: Sequence[str] = (),
        general: str | None = None,
        config: AtmoeConfig | None = None,
        description: str | None = None,
        created_by: str | None = None,
        **options: Any,
    ) -> tuple[dict[str, Any], bool]:
        """Pin a composition version (the same spec returns the existing one); returns (record, created).

        ``config`` says how the experts are mixed; ``options`` are its fields as keywords instead
        (``lam=0.7, router="flat"``), for a config made here with ``general`` set from ``general``.
        """
        from atmoe.registry import compositions

        if config is None:
            config = AtmoeConfig(**options, general=general is not None)
        elif options:
            raise UsageError(f"pass the settings in config or as keywords, not both ({', '.join(sorted(options))})")
        spec = compositions.ComposeSpec(
            name=name,
            groups=tuple(groups),
            config=config,
            experts=tuple(experts),
            general=general,
            description=description,
        )

        def work(session: Session) -> tuple[CompositionRecord, bool]:
            row, created = compositions.compose(session, spec, created_by=created_by or current_user())
            return compositions.composition_record(row), created

        return self.transact(work)

    def compositions(self, name: str | None = None) -> list[CompositionRecord]:
        from atmoe.registry import compositions

        with self.session() as session:
            return [compositions.composition_record(c) for c in compositions.list_compositions(session, name)]

    def composition(self, ref: str) -> CompositionRecord:
        from atmoe.registry import compositions

        with self.session() as session:
            return compositions.composition_record(compositions.get_composition(session, ref))

    def remove_composition(self, ref: str, force: bool = False) -> list[str]:
        """Remove composition versions and their routers (see ``compositions.remove_composition``)."""
        from atmoe.registry import compositions

        return compositions.remove_composition(self, ref, force=force)

    def check_force(self, ref: str, weights: Mapping[str, float] | None) -> None:
        """Refuse forced weights naming experts outside the composition, before any model is built."""
        if not weights:
            return
        from atmoe.registry import compositions, names

        with self.session() as session:
            composition = compositions.get_composition(session, names.parse_ref(ref))
            compositions.check_forced_names(composition, weights)

    # -- building and routers ------------------------------------------------------------------------
    def build(self, ref: str, *, router: bool = True, base_model: str | None = None, dtype: Any = None) -> Built:
        """Verify every blob, then build the composition's model (+ router); returns ``build.Built``."""
        from atmoe.registry.build import build_composition

        with self.session() as session:
            return build_composition(session, self.store, ref, router=router, base_model=base_model, dtype=dtype)

    @contextmanager
    def expert_folders(self, ref: str) -> Iterator[dict[str, Path]]:
        """The composition's verified adapter folders, in a temporary directory (``build.expert_folders``)."""
        from atmoe.registry.build import expert_folders

        with self.session() as session, expert_folders(session, self.store, ref) as folders:
            yield folders

    def train_router(self, ref: str, **kwargs: Any) -> TrainedRouter:
        """Train and record the next router of ``ref``; see ``router_training.train_and_record``."""
        from atmoe.registry.router_training import train_and_record

        kwargs.setdefault("created_by", current_user())
        return train_and_record(self, ref, **kwargs)

    def record_uniform_router(self, ref: str, **kwargs: Any) -> TrainedRouter:
        """Record the ``uniform`` router of ``ref`` (no data); see ``router_training.record_uniform``."""
        from atmoe.registry.router_training import record_uniform

        kwargs.setdefault("created_by", current_user())
        return record_uniform(self, ref, **kwargs)

    def record_arrow_router(self, ref: str, **kwargs: Any) -> TrainedRouter:
        """Record the training-free ``arrow`` router of ``ref``; see ``router_training.record_arrow``."""
        from atmoe.registry.router_training import record_arrow

        kwargs.setdefault("created_by", current_user())
        return record_arrow(self, ref, **kwargs)

    def record_lorahub_router(self, ref: str, **kwargs: Any) -> TrainedRouter:
        """Search and record the ``lorahub`` router of ``ref``; see ``router_training.record_lorahub``."""
        from atmoe.registry.router_training import record_lorahub

        kwargs.setdefault("created_by", current_user())
        return record_lorahub(self, ref, **kwargs)

    def evaluate(self, ref: str, **kwargs: Any) -> Any:
        """Score a router on a data file and store the row; see ``evaluations.evaluate_and_record``."""
        from atmoe.registry.evaluations import evaluate_and_record

        kwargs.setdefault("created_by", current_user())
        return evaluate_and_record(self, ref, **kwargs)

    def evaluations(self, name: str, *, data_digest: str | None = None) -> Any:
        """The stored evaluations of every router of composition ``name``."""
        from atmoe.registry.evaluations import list_evaluations

        with self.session() as session:
            return list_evaluations(session, name, data_digest=data_digest)

    def routers(self, ref: str) -> list[RouterRecord]:
        from atmoe.registry import routers

        with self.session() as session:
            _, rows = routers.list_routers(session, ref)
            return [routers.router_record(session, row) for row in rows]

    def set_alias(self, router_ref: str, alias: str) -> RouterRecord:
        """Point ``alias`` at the router ``NAME[@VERSION]:ROUTER`` names; returns the router's record."""
        from atmoe.registry import names, routers

        ref = names.parse_ref(router_ref)
        if ref.router is None:
            raise UsageError(f"{router_ref!r} names no router: use NAME[@VERSION]:ROUTER")

        def work(session: Session) -> RouterRecord:
            composition, router = routers.resolve_router(session, ref)
            routers.set_alias(session, composition.name, alias, router)
            return routers.router_record(session, router)

        return self.transact(work)

    # -- expert aliases ------------------------------------------------------------------------------
    def set_expert_alias(self, ref: str, alias: str) -> ExpertAliasRecord:
        """Point ``alias`` at the expert version ``ref`` names (``gastro@3``); an existing alias moves."""
        from atmoe.registry import expert_aliases

        return self.transact(lambda session: expert_aliases.set_expert_alias(session, ref, alias))

    def expert_aliases(self, name: str | None = None) -> list[ExpertAliasRecord]:
        from atmoe.registry import expert_aliases

        with self.session() as session:
            return expert_aliases.list_aliases(session, name)

    # -- the audit log and roles ---------------------------------------------------------------------
    def events(self, **filters: Any) -> list[EventRecord]:
        """The audit log, oldest first; filters as in ``events.read`` (since, actor, action, target, limit)."""
        from atmoe.registry import events

        with self.session() as session:
            return events.read(session, **filters)

    def grant(self, kind: str, role: str) -> roles.RoleChange:
        """PostgreSQL: make the login role ``role`` a reader, writer or admin of this catalog."""
        return roles.grant(self, kind, role)

    def revoke(self, role: str) -> roles.RoleChange:
        return roles.revoke(self, role)

    def role_members(self) -> list[roles.RoleMember]:
        return roles.members(self)
