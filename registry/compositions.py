"""Compositions: pinning chosen experts, group by group, into an immutable AT-MoE spec version.

``compose`` takes the latest version of every expert name in each listed group (``experts`` narrows a
group to the references given), orders groups as listed and experts by name inside a group (or in
the order the references were given), and records N_G, N_M and the pinned name@version + digest of
each member. The same spec composed again returns the existing version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from atmoe.config import AtmoeConfig
from atmoe.errors import CompositionNotFound, GroupNotFound, InUse, InvalidComposition, UsageError
from atmoe.registry import events, roles
from atmoe.registry.experts import get_expert
from atmoe.registry.models import Composition, CompositionExpert, Expert, Group
from atmoe.registry.names import Ref, parse_ref, validate_name
from atmoe.registry.records import CompositionRecord

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry


@dataclass(frozen=True)
class ComposeSpec:
    """What a user asked for: the groups, optional narrowing expert references, the general expert's
    reference, and how to mix them (``AtmoeConfig``, whose ``general`` must say whether there is one)."""

    name: str
    groups: tuple[str, ...]
    config: AtmoeConfig
    experts: tuple[str, ...] = ()
    general: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name, "composition name")
        if not self.groups:
            raise UsageError("--groups is empty: name at least one group, e.g. functional,domain,style")
        if len(set(self.groups)) != len(self.groups):
            raise UsageError(f"--groups lists a group twice: {','.join(self.groups)}")
        for group in self.groups:
            validate_name(group, "group name")
        if self.config.general != (self.general is not None):
            raise UsageError("the composition's config and --general disagree on whether there is a general expert")


def _latest_per_name(session: Session, group: Group) -> list[Expert]:
    latest = (
        select(Expert.name, func.max(Expert.version).label("version"))
        .where(Expert.group_id == group.id)
        .group_by(Expert.name)
        .subquery()
    )
    query = (
        select(Expert)
        .join(latest, (Expert.name == latest.c.name) & (Expert.version == latest.c.version))
        .order_by(Expert.name)
    )
    return list(session.scalars(query))


def plan_members(session: Session, spec: ComposeSpec) -> tuple[dict[str, list[Expert]], Expert | None]:
    """The experts of each group, in slot order, and the general expert; refuses bad specs."""
    groups = {}
    for name in spec.groups:
        group = session.scalars(select(Group).where(Group.name == name)).first()
        if group is None:
            raise GroupNotFound(f"unknown group {name!r}: see `atmoe-reg groups` (add it with --add)")
        groups[name] = group
    chosen: dict[str, list[Expert]] = {name: [] for name in spec.groups}
    seen: set[str] = set()
    for text in spec.experts:
        expert = get_expert(session, text)
        if expert.name in seen:
            raise InvalidComposition(f"duplicate expert {expert.name!r} in the composition")
        seen.add(expert.name)
        if expert.group.name not in chosen:
            raise InvalidComposition(
                f"expert {expert.ref} is in group {expert.group.name!r}, which --groups does not list"
            )
        chosen[expert.group.name].append(expert)
    members = {}
    for name, group in groups.items():
        experts = chosen[name] or _latest_per_name(session, group)
        if not experts:
            raise InvalidComposition(
                f"group {name!r} has no experts: add one with `atmoe-reg add-expert ... --group {name}`"
            )
        members[name] = experts
    general = get_expert(session, spec.general) if spec.general else None
    if general is not None and any(e.name == general.name for es in members.values() for e in es):
        raise InvalidComposition(f"duplicate expert {general.name!r}: it is both a member and the general expert")
    everyone = [e for es in members.values() for e in es] + ([general] if general else [])
    bases = {(e.base_model or "?", e.base_revision or "") for e in everyone}
    if len(bases) > 1:
        listing = "; ".join(f"{e.ref}: {e.base_model or 'unknown'}" for e in everyone)
        raise InvalidComposition(f"experts of different base models cannot be composed ({listing})")
    return members, general


def spec_digest(config: AtmoeConfig, members: dict[str, list[Expert]], general: Expert | None) -> str:
    """sha256 of the canonical spec: the same experts, order and settings give the same digest."""
    document = {
        "groups": [[group, [[e.name, e.version, e.digest] for e in experts]] for group, experts in members.items()],
        "general": [general.name, general.version, general.digest] if general else None,
        **config.to_columns(),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def compose(session: Session, spec: ComposeSpec, *, created_by: str | None = None) -> tuple[Composition, bool]:
    """Record (or find) the composition version of ``spec`` in ``session``; returns (row, created).
    A new version is logged as a ``compose`` event."""
    roles.require(session, "compose")
    members, general = plan_members(session, spec)
    composition, created = pin(session, spec, members, general, created_by=created_by)
    if created:
        pinned = {group: [e.ref for e in experts] for group, experts in members.items()}
        details = {"groups": pinned, "general": general.ref if general else None, "asked": list(spec.experts)}
        events.record(session, "compose", composition.ref, details)
    return composition, created


def composition_config(composition: Composition) -> AtmoeConfig:
    """The ``AtmoeConfig`` a composition version stores."""
    return AtmoeConfig.from_columns(
        {
            "lam": composition.lam,
            "learn_lambda": composition.learn_lambda,
            "temperature": composition.temperature,
            "routing": composition.routing,
            "options": composition.options,
        },
        general=composition.general_expert_id is not None,
    )


def pin(
    session: Session,
    spec: ComposeSpec,
    members: dict[str, list[Expert]],
    general: Expert | None,
    *,
    created_by: str | None = None,
    created_at=None,
) -> tuple[Composition, bool]:
    """The composition version pinning ``members`` (group -> experts in slot order) under ``spec``:
    the existing one with the same spec digest, else the next version. Shared by compose and import."""
    from atmoe.registry.db import next_value

    digest = spec_digest(spec.config, members, general)
    existing = session.scalars(
        select(Composition).where(Composition.name == spec.name, Composition.spec_digest == digest)
    ).first()
    if existing is not None:
        return existing, False
    first = next(iter(members.values()))[0]
    composition = Composition(
        name=spec.name,
        version=next_value(session, Composition.version, Composition.name == spec.name),
        base_model=first.base_model,
        base_revision=first.base_revision,
        groups=list(members),
        n_groups=len(members),
        n_max=max(len(experts) for experts in members.values()),
        **spec.config.to_columns(),
        general_expert=general,
        spec_digest=digest,
        description=spec.description,
        created_by=created_by,
    )
    if created_at is not None:
        composition.created_at = created_at
    for group_index, (group, experts) in enumerate(members.items()):
        for slot, expert in enumerate(experts):
            composition.members.append(
                CompositionExpert(
                    expert=expert, group_name=group, group_index=group_index, slot=slot, digest=expert.digest
                )
            )
    session.add(composition)
    session.flush()
    return composition, True


def get_composition(session: Session, ref: Ref | str) -> Composition:
    """The composition version a reference names (latest when no version)."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    refuse_version_alias(ref)
    query = select(Composition).where(Composition.name == ref.name)
    if ref.version is None:
        query = query.order_by(Composition.version.desc()).limit(1)
    else:
        query = query.where(Composition.version == ref.version)
    composition = session.scalars(query).first()
    if composition is None:
        raise CompositionNotFound(f"no composition {ref.name}" + (f"@{ref.version}" if ref.version else ""))
    return composition


def refuse_version_alias(ref: Ref) -> None:
    """Composition versions are numbers; aliases belong to experts (``gastro@stable``) and routers
    (``med:prod``)."""
    if ref.alias is not None:
        raise CompositionNotFound(
            f"no composition {ref.name}@{ref.alias}: composition versions are numbers (a router alias "
            f"reads {ref.name}:{ref.alias})"
        )


def list_compositions(session: Session, name: str | None = None) -> list[Composition]:
    query = select(Composition).order_by(Composition.name, Composition.version)
    if name is not None:
        query = query.where(Composition.name == name)
    return list(session.scalars(query))


def composition_record(composition: Composition) -> CompositionRecord:
    """The typed record of a composition version (``compositions --json`` prints its ``to_dict()``)."""
    return CompositionRecord.from_row(composition)


def members_by_group(composition: Composition) -> dict[str, list[CompositionExpert]]:
    """Members in group order, slot order: the layout ``build_atmoe`` receives."""
    grouped: dict[str, list[CompositionExpert]] = {group: [] for group in composition.groups}
    for member in sorted(composition.members, key=lambda m: (m.group_index, m.slot)):
        grouped[member.group_name].append(member)
    return grouped


def check_forced_names(composition: Composition, weights) -> None:
    """Forced weights may only name the composition's routed experts (a usage error otherwise)."""
    known = [m.expert.name for m in composition.members]
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise UsageError(
            f"--force names {', '.join(repr(n) for n in unknown)}, not an expert of {composition.ref} "
            f"(experts: {', '.join(known)})"
        )


def remove_composition(registry: Registry, ref: str, *, force: bool = False) -> list[str]:
    """Remove composition versions and their routers; returns the removed ``name@version`` refs.

    ``NAME@VERSION`` removes that version; a bare ``NAME`` the only version, or every version with
    ``force``. Refused (``InUse``) while an alias points at one of their routers, unless ``force``.
    The experts it pinned can then be removed; router blobs stay in the store until ``gc``.
    """
    from sqlalchemy import delete

    from atmoe.registry.models import Router, RouterAlias

    parsed = parse_ref(ref)
    if parsed.router is not None:
        raise UsageError(f"{ref!r} names a router; remove a composition by NAME or NAME@VERSION")

    def work(session: Session) -> list[str]:
        roles.require(session, "remove compositions")
        if parsed.version is not None or "@" in ref:
            rows = [get_composition(session, parsed)]
        else:
            rows = list(session.scalars(select(Composition).where(Composition.name == parsed.name)
                                        .order_by(Composition.version)))  # fmt: skip
            if not rows:
                get_composition(session, parsed)  # raises CompositionNotFound
            if len(rows) > 1 and not force:
                versions = ", ".join(str(c.version) for c in rows)
                raise UsageError(f"composition {parsed.name!r} has versions {versions}: name one as "
                                 f"{parsed.name}@VERSION, or pass --force to remove them all")  # fmt: skip
        ids = [c.id for c in rows]
        router_ids = list(session.scalars(select(Router.id).where(Router.composition_id.in_(ids))))
        aliases = list(session.scalars(select(RouterAlias.alias).where(RouterAlias.router_id.in_(router_ids))))
        if aliases and not force:
            raise InUse(f"alias {', '.join(sorted(aliases))} points at a router of "
                        f"{', '.join(c.ref for c in rows)}; move it, or pass --force to remove it too")  # fmt: skip
        removed = [c.ref for c in rows]
        session.execute(delete(RouterAlias).where(RouterAlias.router_id.in_(router_ids)))
        session.execute(delete(Router).where(Router.composition_id.in_(ids)))
        session.execute(delete(CompositionExpert).where(CompositionExpert.composition_id.in_(ids)))
        session.execute(delete(Composition).where(Composition.id.in_(ids)))
        for removed_ref in removed:
            events.record(session, "remove", removed_ref, {"kind": "composition", "aliases": sorted(aliases)})
        return removed

    return registry.transact(work, attempts=1)
