"""Typed records: what the services return, frozen, with ``to_dict()`` for ``--json`` and archives.

ORM rows stay inside the services (a row outlives its session badly: lazy relationships fail once
the session is closed); every ``Registry`` method returns these instead. ``to_dict()`` is the one JSON
form of each record: the CLI's ``--json``, the archive manifest and the router lineage all print it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from atmoe.config import AtmoeConfig

if TYPE_CHECKING:
    from atmoe.registry.models import Composition, Evaluation, Expert, Router


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; every moment is stored in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


@dataclass(frozen=True)
class GroupRecord:
    """A group of experts (functional, domain, style, ...)."""

    name: str
    description: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description}


@dataclass(frozen=True)
class ExpertFile:
    """One file of an expert: its path inside the adapter directory, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ExpertRecord:
    """One expert version, everything the catalog knows about it."""

    name: str
    version: int
    group: str
    domain: str | None
    style: str | None
    tags: Mapping[str, str]
    description: str | None
    base_model: str | None
    base_revision: str | None
    peft_type: str
    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    module_ranks: Mapping[str, int]
    digest: str
    size: int
    created_at: datetime | None
    created_by: str | None
    source: str | None
    files: tuple[ExpertFile, ...] | None = None  # None when not loaded (listings)
    aliases: tuple[str, ...] | None = None  # the aliases pointing at this version (show); None: not read

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, expert: Expert, *, files: bool = True, aliases: tuple[str, ...] | None = None) -> ExpertRecord:
        return cls(
            name=expert.name,
            version=expert.version,
            group=expert.group.name,
            domain=expert.domain,
            style=expert.style,
            tags=dict(expert.tags or {}),
            description=expert.description,
            base_model=expert.base_model,
            base_revision=expert.base_revision,
            peft_type=expert.peft_type,
            r=expert.r,
            alpha=expert.alpha,
            use_rslora=expert.use_rslora,
            target_modules=tuple(expert.target_modules or ()),
            rank_pattern=dict(expert.rank_pattern or {}),
            alpha_pattern=dict(expert.alpha_pattern or {}),
            module_ranks=dict(expert.module_ranks or {}),
            digest=expert.digest,
            size=expert.size,
            created_at=expert.created_at,
            created_by=expert.created_by,
            source=expert.source,
            files=tuple(ExpertFile(f.path, f.sha256, f.size) for f in expert.files) if files else None,
            aliases=aliases,
        )

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "group": self.group,
            "domain": self.domain,
            "style": self.style,
            "tags": dict(self.tags),
            "description": self.description,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "peft_type": self.peft_type,
            "r": self.r,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "module_ranks": dict(self.module_ranks),
            "digest": self.digest,
            "size": self.size,
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
            "source": self.source,
        }
        if self.aliases is not None:
            record["aliases"] = list(self.aliases)
        if self.files is not None:
            record["files"] = [f.to_dict() for f in self.files]
        return record


@dataclass(frozen=True)
class CompositionMember:
    """One pinned expert of a composition: its group, slot, and the exact version and digest."""

    group: str
    slot: int
    name: str
    version: int
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "slot": self.slot, "name": self.name, "version": self.version,
                "ref": self.ref, "digest": self.digest}  # fmt: skip


@dataclass(frozen=True)
class PinnedExpert:
    """A reference pinned by version and digest (the general expert)."""

    name: str
    version: int
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest}


@dataclass(frozen=True)
class CompositionRecord:
    """One immutable composition version: its pinned experts, slot by slot, and its ``AtmoeConfig``."""

    name: str
    version: int
    base_model: str | None
    base_revision: str | None
    groups: tuple[str, ...]
    n_groups: int
    n_max: int
    members: tuple[CompositionMember, ...]
    general: PinnedExpert | None
    config: AtmoeConfig
    spec_digest: str
    description: str | None
    created_at: datetime | None
    created_by: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, composition: Composition) -> CompositionRecord:
        from atmoe.registry.compositions import composition_config

        general = composition.general_expert
        members = sorted(composition.members, key=lambda m: (m.group_index, m.slot))
        return cls(
            name=composition.name,
            version=composition.version,
            base_model=composition.base_model,
            base_revision=composition.base_revision,
            groups=tuple(composition.groups),
            n_groups=composition.n_groups,
            n_max=composition.n_max,
            members=tuple(
                CompositionMember(m.group_name, m.slot, m.expert.name, m.expert.version, m.digest) for m in members
            ),
            general=PinnedExpert(general.name, general.version, general.digest) if general else None,
            config=composition_config(composition),
            spec_digest=composition.spec_digest,
            description=composition.description,
            created_at=composition.created_at,
            created_by=composition.created_by,
        )

    def to_dict(self) -> dict[str, Any]:
        columns = self.config.to_columns()
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "groups": list(self.groups),
            "n_groups": self.n_groups,
            "n_max": self.n_max,
            "experts": [m.to_dict() for m in self.members],
            "general": self.general.to_dict() if self.general else None,
            "lambda": columns["lam"],
            "learn_lambda": columns["learn_lambda"],
            "temperature": columns["temperature"],
            "routing": columns["routing"],
            "options": columns["options"],
            "spec_digest": self.spec_digest,
            "description": self.description,
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class RouterRecord:
    """One router of a composition version, with its lineage: data digests, hyperparameters, metrics."""

    composition: str
    number: int
    aliases: tuple[str, ...]
    blob_digest: str
    data_digest: str | None
    eval_data_digest: str | None
    hyperparameters: Mapping[str, Any]
    metrics: Mapping[str, Any]
    library_versions: Mapping[str, str]
    created_at: datetime | None
    created_by: str | None
    notes: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.composition}:{self.number}"

    @property
    def kind(self) -> str:
        """How the router was made: ``trained`` (train-router on data), ``uniform``, ``arrow``, ``arrow+gks``
        or ``lorahub``."""
        return str(self.hyperparameters.get("kind", "trained"))

    @classmethod
    def from_row(cls, router: Router, aliases: list[str]) -> RouterRecord:
        return cls(
            composition=router.composition.ref,
            number=router.number,
            aliases=tuple(aliases),
            blob_digest=router.blob_digest,
            data_digest=router.data_digest,
            eval_data_digest=router.eval_data_digest,
            hyperparameters=dict(router.hyperparameters or {}),
            metrics=dict(router.metrics or {}),
            library_versions=dict(router.library_versions or {}),
            created_at=router.created_at,
            created_by=router.created_by,
            notes=router.notes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "composition": self.composition,
            "number": self.number,
            "ref": self.ref,
            "kind": self.kind,
            "aliases": list(self.aliases),
            "blob_digest": self.blob_digest,
            "data_digest": self.data_digest,
            "eval_data_digest": self.eval_data_digest,
            "hyperparameters": dict(self.hyperparameters),
            "metrics": dict(self.metrics),
            "library_versions": dict(self.library_versions),
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class EvaluationRecord:
    """A router's stored scores on one data file (``atmoe-reg eval``), for ``evals`` to compare."""

    id: int
    router: str  # NAME@VERSION:NUMBER
    kind: str
    data_digest: str
    examples: int
    metrics: Mapping[str, Any]
    settings: Mapping[str, Any]
    library_versions: Mapping[str, str]
    created_at: datetime | None
    created_by: str | None

    @classmethod
    def from_row(cls, evaluation: Evaluation) -> EvaluationRecord:
        router = evaluation.router
        return cls(
            id=evaluation.id,
            router=f"{router.composition.ref}:{router.number}",
            kind=str((router.hyperparameters or {}).get("kind", "trained")),
            data_digest=evaluation.data_digest,
            examples=evaluation.examples,
            metrics=dict(evaluation.metrics or {}),
            settings=dict(evaluation.settings or {}),
            library_versions=dict(evaluation.library_versions or {}),
            created_at=evaluation.created_at,
            created_by=evaluation.created_by,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "router": self.router,
            "kind": self.kind,
            "data_digest": self.data_digest,
            "examples": self.examples,
            "metrics": dict(self.metrics),
            "settings": dict(self.settings),
            "library_versions": dict(self.library_versions),
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
        }
