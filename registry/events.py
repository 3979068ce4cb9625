"""The audit log: one append-only ``events`` row per change, written in the change's own transaction.

Every service that changes the catalog calls ``record`` inside the transaction of its change, so a
failed change records nothing and a committed one is always logged. Actions:

========================  ======================================  ==========================================
action                    target                                  details
========================  ======================================  ==========================================
``add``                   the new expert version ``gastro@3``     group, digest, files, size
``remove``                ``gastro@3`` or a composition           kind (expert or composition), aliases
``add-group``             the group                               description
``compose``               the new composition version ``med@2``   groups, experts (pinned refs), general
``train``                 the new router ``med@2:3``              kind, data and eval digests, warm start
``alias``                 ``med:prod`` or ``gastro@stable``       to, from (None for a new alias)
``import``                the archive's file name                 what was added
``gc``                    the store                               blobs and bytes removed, temp files
``grant`` / ``revoke``    the database role                       role (reader, writer, admin), previous
========================  ======================================  ==========================================

``actor`` is the OS user; on PostgreSQL the database stamps ``db_user`` (``session_user``) and ``at``
itself (migration 0005), so neither can be forged by a client. Reading: ``read`` (``atmoe-reg log``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from atmoe.errors import UsageError
from atmoe.registry.models import Event

ACTIONS = ("add", "remove", "add-group", "compose", "train", "eval", "alias", "import", "gc", "grant", "revoke")
DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def record(session: Session, action: str, target: str, details: Mapping[str, Any] | None = None) -> None:
    """Add the event of a change to ``session``'s transaction (it commits, or rolls back, with it)."""
    from atmoe.registry.experts import current_user

    if action not in ACTIONS:  # a programming error: the log's vocabulary is fixed
        raise ValueError(f"unknown event action {action!r}")
    session.add(Event(actor=current_user(), action=action, target=target, details=dict(details or {})))
    session.flush()


@dataclass(frozen=True)
class EventRecord:
    """One logged change."""

    id: int
    at: datetime
    actor: str | None
    db_user: str | None
    action: str
    target: str
    details: Mapping[str, Any]

    @classmethod
    def from_row(cls, event: Event) -> EventRecord:
        at = event.at if event.at.tzinfo is not None else event.at.replace(tzinfo=timezone.utc)
        return cls(event.id, at.astimezone(timezone.utc), event.actor, event.db_user, event.action, event.target,
                   dict(event.details or {}))  # fmt: skip

    @property
    def who(self) -> str:
        """``alice`` (SQLite, or the same OS and database user), else ``alice (db bob)``."""
        if self.db_user is None or self.db_user == self.actor:
            return self.actor or "?"
        return f"{self.actor or '?'} (db {self.db_user})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "db_user": self.db_user,
            "action": self.action,
            "target": self.target,
            "details": dict(self.details),
        }


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or date-time (UTC unless it carries an offset), or a duration back
    from ``now``: ``30s``, ``90m``, ``2h``, ``7d``, ``2w``. Returns an aware UTC datetime."""
    now = now or datetime.now(timezone.utc)
    value = text.strip()
    match = DURATION.match(value)
    if match:
        return now - timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected an ISO date or time (2026-12-01, 2026-12-01T09:30, ...+02:00) "
            "or a duration such as 30m, 2h, 7d, 2w"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def read(
    session: Session,
    *,
    since: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    limit: int | None = 100,
) -> list[EventRecord]:
    """The newest ``limit`` events matching the filters (all of them when ``limit`` is None), oldest
    first. ``actor`` matches the OS user or the database role; ``target`` a target or what a name
    holds (``gastro``: ``gastro@3``, ``gastro@stable``; ``med``: ``med@2``, ``med@2:1``, ``med:prod``)."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, not {limit}")
    if action is not None and action not in ACTIONS:
        raise UsageError(f"--action {action!r}: expected one of {', '.join(ACTIONS)}")
    statement = select(Event)
    if since is not None:
        if session.get_bind().dialect.name == "sqlite":  # stored as naive UTC text
            since = since.astimezone(timezone.utc).replace(tzinfo=None)
        statement = statement.where(Event.at >= since)
    if actor is not None:
        statement = statement.where(or_(Event.actor == actor, Event.db_user == actor))
    if action is not None:
        statement = statement.where(Event.action == action)
    if target is not None:
        statement = statement.where(
            or_(
                Event.target == target,
                Event.target.startswith(f"{target}@", autoescape=True),
                Event.target.startswith(f"{target}:", autoescape=True),
            )
        )
    statement = statement.order_by(Event.id.desc())
    if limit is not None:
        statement = statement.limit(limit)
    return [EventRecord.from_row(event) for event in reversed(list(session.scalars(statement)))]
