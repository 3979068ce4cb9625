"""Groups: the catalog's labels for kinds of experts (functional, domain, style, ...); groups are data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from atmoe.errors import GroupNotFound
from atmoe.registry.models import Expert, Group
from atmoe.registry.names import validate_name

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry


def get_group(session: Session, name: str) -> Group:
    group = session.scalar(select(Group).where(Group.name == name))
    if group is None:
        known = ", ".join(session.scalars(select(Group.name).order_by(Group.name)))
        raise GroupNotFound(f"unknown group {name!r} (known: {known}); add it with: atmoe-reg groups --add {name}")
    return group


# --------------------------------------------------------------------------------------


def list_groups(session: Session) -> list[Group]:
    return list(session.scalars(select(Group).order_by(Group.id)))


def group_summaries(session: Session) -> list[dict[str, Any]]:
    statement = select(Expert.group_id, func.count(func.distinct(Expert.name))).group_by(Expert.group_id)
    counts = {group_id: count for group_id, count in session.execute(statement)}
    return [
        {"name": g.name, "description": g.description, "experts": counts.get(g.id, 0)} for g in list_groups(session)
    ]


def add_group(registry: Registry, name: str, description: str | None = None) -> tuple[Group, bool]:
    """Add a group; returns ``(group, created)`` (False when it already exists). Logged as an
    ``add-group`` event."""
    from atmoe.registry import events, roles

    validate_name(name, "group")

    def insert(session: Session) -> tuple[Group, bool]:
        existing = session.scalar(select(Group).where(Group.name == name))
        if existing is not None:
            return existing, False
        roles.require(session, "add groups")
        group = Group(name=name, description=description)
        session.add(group)
        session.flush()
        events.record(session, "add-group", name, {"description": description})
        return group, True

    return registry.transact(insert)
