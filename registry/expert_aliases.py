"""Expert aliases: movable names for expert versions, ``gastro@stable``, as routers have ``letters:prod``.

An alias is scoped to an expert name and points at one of its versions; it resolves wherever an
expert reference ``NAME[@VERSION]`` is accepted (``show``, ``compose --expert`` / ``--general``,
``verify``, ``remove``, ``export``). It is never all digits nor ``latest``: it would shadow a version.
Setting a new alias is a writer's right, moving one an admin's (``roles.py``); each change is an
``alias`` event. A composition pins the version an alias points at when it is composed: moving the
alias later changes no composition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from atmoe.errors import ExpertNotFound, UsageError
from atmoe.registry import events, roles
from atmoe.registry.models import Expert, ExpertAlias
from atmoe.registry.names import Ref, parse_ref, validate_alias


@dataclass(frozen=True)
class ExpertAliasRecord:
    """``name@alias`` -> ``name@version``; ``previous`` is where it pointed before (None: new)."""

    name: str
    alias: str
    version: int
    previous: int | None = None
    changed: bool = True

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    @property
    def target(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.ref, "name": self.name, "target": self.target, "version": self.version,
                "previous": self.previous}  # fmt: skip


def aliased_expert(session: Session, ref: Ref) -> Expert:
    """The expert version ``NAME@ALIAS`` points at (files loaded); ExpertNotFound naming the known ones."""
    assert ref.alias is not None
    expert = session.scalar(
        select(Expert)
        .join(ExpertAlias, ExpertAlias.expert_id == Expert.id)
        .where(ExpertAlias.name == ref.name, ExpertAlias.alias == ref.alias)
        .options(selectinload(Expert.files))
    )
    if expert is not None:
        return expert
    known = [a.alias for a in list_aliases(session, ref.name)]
    if known:
        raise ExpertNotFound(f"expert {ref.name!r} has no alias {ref.alias!r} (aliases: {', '.join(known)})")
    if session.scalar(select(Expert.id).where(Expert.name == ref.name).limit(1)) is None:
        raise ExpertNotFound(f"no expert named {ref.name!r}; see atmoe-reg list")
    raise ExpertNotFound(
        f"expert {ref.name!r} has no alias {ref.alias!r} (it has none: atmoe-reg alias-expert "
        f"{ref.name}@VERSION {ref.alias})"
    )


def set_expert_alias(session: Session, ref: str, alias: str) -> ExpertAliasRecord:
    """Point ``alias`` at the expert version ``ref`` names (``gastro@3``, or another alias); an
    existing alias moves. Logged as an ``alias`` event unless nothing changed."""
    from atmoe.registry.experts import get_expert

    validate_alias(alias, "version")
    parsed = parse_ref(ref)
    if parsed.router is not None:
        raise UsageError(f"{ref!r}: an expert reference takes no ':ROUTER' part")
    expert = get_expert(session, parsed)
    row = session.scalar(select(ExpertAlias).where(ExpertAlias.name == expert.name, ExpertAlias.alias == alias))
    if row is not None and row.expert_id == expert.id:
        return ExpertAliasRecord(expert.name, alias, expert.version, expert.version, changed=False)
    previous = None if row is None else row.expert.version
    if row is None:
        roles.require(session, "set a new expert alias")
        session.add(ExpertAlias(name=expert.name, alias=alias, expert=expert))
    else:
        roles.require(session, "move an expert alias")
        row.expert = expert
    session.flush()
    record = ExpertAliasRecord(expert.name, alias, expert.version, previous)
    events.record(session, "alias", record.ref, {"to": record.target, "from": _ref(expert.name, previous)})
    return record


def _ref(name: str, version: int | None) -> str | None:
    return None if version is None else f"{name}@{version}"


def list_aliases(session: Session, name: str | None = None) -> list[ExpertAliasRecord]:
    """Every expert alias (of ``name``), by name and alias."""
    statement = select(ExpertAlias.name, ExpertAlias.alias, Expert.version).join(
        Expert, ExpertAlias.expert_id == Expert.id
    )
    if name is not None:
        statement = statement.where(ExpertAlias.name == name)
    rows = session.execute(statement.order_by(ExpertAlias.name, ExpertAlias.alias))
    return [ExpertAliasRecord(n, a, v, changed=False) for n, a, v in rows]


def aliases_of(session: Session, expert_ids: list[int]) -> list[ExpertAliasRecord]:
    """The aliases that point at any of ``expert_ids``."""
    rows = session.execute(
        select(ExpertAlias.name, ExpertAlias.alias, Expert.version)
        .join(Expert, ExpertAlias.expert_id == Expert.id)
        .where(ExpertAlias.expert_id.in_(expert_ids))
        .order_by(ExpertAlias.name, ExpertAlias.alias)
    )
    return [ExpertAliasRecord(n, a, v, changed=False) for n, a, v in rows]
