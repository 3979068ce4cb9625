"""Typed SQLAlchemy 2.x models of the catalog (DESIGN.md section 3).

The schema is owned by the Alembic revisions in ``migrations/versions``; ``tests/test_migrations.py``
checks that ``upgrade head`` produces exactly these tables. Change both together. Beside them,
migration 0004 makes the engine-specific search index of ``list --search`` (``search.py``: an FTS5
table kept by triggers on ``experts`` on SQLite, a GIN index on PostgreSQL), which the comparison
skips; a batch migration that copies ``experts`` on SQLite must create those triggers again.

Tables:

- ``groups``: the expert groups (functional, domain, style, general, ... are data, not code)
- ``experts`` and ``expert_files``: one row per expert version, one blob per file
- ``compositions`` and ``composition_experts``: immutable composition versions; the link row pins
  each expert by id (name@version) and content digest, with its group and slot
- ``routers`` and ``router_aliases``: trained routers of a composition version, and movable aliases
- ``expert_aliases``: movable names of expert versions (``gastro@stable``)
- ``events``: the append-only audit log (``events.py``); the database refuses UPDATE and DELETE
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so that batch migrations on SQLite can find and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 64  # names.NAME_PATTERN allows at most 64 characters
DIGEST_LENGTH = 64  # hex sha256

DEFAULT_GROUPS = {
    "functional": "What the expert does (diagnosis, prescribing, ...)",
    "domain": "Domain knowledge (gastroenterology, cardiology, ...)",
    "style": "Answer style (rigorous, concise, ...)",
    "general": "General experts trained on all tasks' data",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[str]: JSON,
        datetime: DateTime(timezone=True),
    }


class CatalogIdentity(Base):
    """One row: the id of this catalog. Its blob store records the same id (``store/catalog-id``),
    so that gc never runs a store against a catalog that is not its own."""

    __tablename__ = "catalog_identity"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Group({self.name!r})"


class Expert(Base):
    """One immutable version of a LoRA expert. ``digest`` is the content digest of its files."""

    __tablename__ = "experts"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # re-adding identical content under the same name never makes a second version
        UniqueConstraint("name", "digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    version: Mapped[int] = mapped_column(Integer)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"), index=True)
    domain: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    style: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    description: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str | None] = mapped_column(String(512), index=True)
    base_revision: Mapped[str | None] = mapped_column(String(256))
    peft_type: Mapped[str] = mapped_column(String(32))
    r: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    target_modules: Mapped[list[str]] = mapped_column(default=list)
    # {module name: rank}, e.g. {"model.layers.0.self_attn.q_proj": 8}
    module_ranks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rank_pattern: Mapped[dict[str, Any]] = mapped_column(default=dict)
    alpha_pattern: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # sha256 of the manifest in sha256sum format, "SHA256  PATH\n" sorted by path (experts.content_digest)
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), index=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(Text)

    group: Mapped[Group] = relationship(lazy="joined", innerjoin=True)
    files: Mapped[list[ExpertFile]] = relationship(
        back_populates="expert",
        cascade="all, delete-orphan",
        order_by="ExpertFile.path",
        lazy="selectin",
    )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def group_name(self) -> str:
        return self.group.name

    def __repr__(self) -> str:
        return f"Expert({self.ref!r}, group={self.group.name!r}, digest={self.digest[:12]!r})"


class ExpertFile(Base):
    """One file of an expert version; its bytes are the blob ``sha256`` in the store."""

    __tablename__ = "expert_files"
    __table_args__ = (UniqueConstraint("expert_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(DIGEST_LENGTH), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    expert: Mapped[Expert] = relationship(back_populates="files")

    def __repr__(self) -> str:
        return f"ExpertFile({self.path!r}, sha256={self.sha256[:12]!r}, size={self.size})"


class Composition(Base):
    """One immutable composition version. ``spec_digest`` makes composing the same spec idempotent."""

    __tablename__ = "compositions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        UniqueConstraint("name", "spec_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str | None] = mapped_column(String(512))
    base_revision: Mapped[str | None] = mapped_column(String(256))
    groups: Mapped[list[str]] = mapped_column(default=list)  # ordered group names
    n_groups: Mapped[int] = mapped_column(Integer)  # N_G
    n_max: Mapped[int] = mapped_column(Integer)  # N_M, the largest group size
    lam: Mapped[float] = mapped_column(Float, default=1.0)
    learn_lambda: Mapped[bool] = mapped_column(Boolean, default=False)
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    routing: Mapped[str] = mapped_column(String(16), default="sequence")
    # further AtmoeConfig switches (router kind, shared router, static inside weights, ...)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    general_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"), index=True)
    spec_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(256))

    general_expert: Mapped[Expert | None] = relationship(lazy="joined")
    members: Mapped[list[CompositionExpert]] = relationship(
        back_populates="composition",
        cascade="all, delete-orphan",
        order_by=lambda: [CompositionExpert.group_index, CompositionExpert.slot],
        lazy="selectin",
    )
    routers: Mapped[list[Router]] = relationship(
        back_populates="composition",
        cascade="all, delete-orphan",
        order_by="Router.number",
        lazy="select",
    )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def __repr__(self) -> str:
        return f"Composition({self.ref!r}, groups={self.groups!r})"


class CompositionExpert(Base):
    """Link row: an expert pinned into a composition, with its group, slot and content digest."""

    __tablename__ = "composition_experts"
    __table_args__ = (
        UniqueConstraint("composition_id", "expert_id"),
        UniqueConstraint("composition_id", "group_name", "slot"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    composition_id: Mapped[int] = mapped_column(ForeignKey("compositions.id", ondelete="CASCADE"))
    # no ON DELETE: a pinned expert cannot be removed (experts.remove_expert says so first)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    group_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    group_index: Mapped[int] = mapped_column(Integer)  # position of the group in Composition.groups
    slot: Mapped[int] = mapped_column(Integer)  # m(e), 0-based inside the group
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))  # the expert's content digest

    composition: Mapped[Composition] = relationship(back_populates="members")
    expert: Mapped[Expert] = relationship(lazy="joined")

    def __repr__(self) -> str:
        return f"CompositionExpert({self.group_name!r}, slot={self.slot}, expert_id={self.expert_id})"


class Router(Base):
    """A trained router of one composition version; its weights are the safetensors blob."""

    __tablename__ = "routers"
    __table_args__ = (UniqueConstraint("composition_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    composition_id: Mapped[int] = mapped_column(ForeignKey("compositions.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    blob_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), index=True)
    data_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))
    eval_data_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    library_versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(256))
    notes: Mapped[str | None] = mapped_column(Text)

    composition: Mapped[Composition] = relationship(back_populates="routers", lazy="joined")

    def __repr__(self) -> str:
        return f"Router(composition_id={self.composition_id}, number={self.number})"


class RouterAlias(Base):
    """A movable name (e.g. ``prod``) for a router, scoped to a composition name."""

    __tablename__ = "router_aliases"
    __table_args__ = (UniqueConstraint("composition_name", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    composition_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    alias: Mapped[str] = mapped_column(String(NAME_LENGTH))
    router_id: Mapped[int] = mapped_column(ForeignKey("routers.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    router: Mapped[Router] = relationship(lazy="joined")

    def __repr__(self) -> str:
        return f"RouterAlias({self.composition_name!r}, {self.alias!r} -> router_id={self.router_id})"


class ExpertAlias(Base):
    """A movable name (e.g. ``stable``) for one version of an expert: ``gastro@stable``."""

    __tablename__ = "expert_aliases"
    __table_args__ = (UniqueConstraint("name", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the expert's name (the alias's scope)
    alias: Mapped[str] = mapped_column(String(NAME_LENGTH))
    # no ON DELETE: an aliased version cannot be removed by accident (experts.remove_expert says so)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    expert: Mapped[Expert] = relationship(lazy="joined", innerjoin=True)

    def __repr__(self) -> str:
        return f"ExpertAlias({self.name!r}, {self.alias!r} -> expert_id={self.expert_id})"


class Event(Base):
    """One entry of the audit log: who did what to which object, and when (``events.py``).

    Append-only: triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL), and no role but the
    owner is granted more than INSERT and SELECT. On PostgreSQL a trigger also stamps ``at`` with the
    server's clock and ``db_user`` with the session's login role, which a client cannot forge.
    """

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(256))  # the OS user who ran the tool
    db_user: Mapped[str | None] = mapped_column(String(256))  # PostgreSQL: session_user; SQLite: None
    action: Mapped[str] = mapped_column(String(32), index=True)  # add, remove, compose, train, alias, ...
    target: Mapped[str] = mapped_column(String(512))  # gastro@3, medqa@2:1, letters:prod, gastro@stable, ...
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    def __repr__(self) -> str:
        return f"Event({self.id}, {self.action!r}, {self.target!r}, actor={self.actor!r})"


class Evaluation(Base):
    """A router's scores on one data file (by digest): ``atmoe-reg eval``; never changed once stored."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    router_id: Mapped[int] = mapped_column(ForeignKey("routers.id", ondelete="CASCADE"), index=True)
    data_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), index=True)
    examples: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # batch size, max length, new tokens
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    library_versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(256))

    router: Mapped[Router] = relationship(lazy="joined")

    def __repr__(self) -> str:
        return f"Evaluation(router_id={self.router_id}, data={self.data_digest[:12]})"
