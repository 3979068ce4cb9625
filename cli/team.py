"""Team commands: the audit log (``log``), roles (``db grant|revoke|roles``) and expert aliases.

The library checks the words (actions, role kinds) and names the valid ones, so that importing this
module stays free of SQLAlchemy (``atmoe-reg --help`` starts fast).
"""

from __future__ import annotations

import json
from typing import Any

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.db import db_group
from atmoe.cli.options import json_option

# -- the audit log -------------------------------------------------------------------------------


def _details(details: dict[str, Any]) -> str:
    parts = []
    for key, value in details.items():
        if value is None or value == [] or value == {}:
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


@main.command("log")
@click.option(
    "--since",
    metavar="WHEN",
    help="Only events since an ISO date/time (UTC unless an offset is given) or a duration back from now: 30m, 2h, 7d, 2w.",
)
@click.option("--actor", metavar="USER", help="Only events by this OS user or database role.")
@click.option(
    "--action",
    metavar="ACTION",
    help="Only events of this action: add, remove, compose, train, alias, import, gc, grant, ...",
)
@click.option(
    "--target",
    metavar="REF",
    help="Only events about this target, or about everything a name holds (gastro: gastro@3, gastro@stable).",
)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="The newest N events.")
@click.option("--all", "everything", is_flag=True, help="Every matching event (no --limit).")
@json_option
def log(since, actor, action, target, limit, everything, as_json) -> None:  # fmt: skip
    """The audit log: who added, removed, composed, trained, aliased, imported, gc'd or granted what, and when (oldest first)."""
    from atmoe.registry.events import parse_since

    moment = parse_since(since) if since is not None else None
    records = get_registry().events(
        since=moment, actor=actor, action=action, target=target, limit=None if everything else limit
    )
    if as_json:
        output.print_json([r.to_dict() for r in records])
        return
    if not records:
        output.message("No events match." if any((since, actor, action, target)) else "No events yet.")
        return
    output.print_table(
        ["at (UTC)", "who", "action", "target", "details"],
        [(r.at.strftime("%Y-%m-%d %H:%M:%S"), r.who, r.action, r.target, _details(dict(r.details))) for r in records],
    )


# -- roles (PostgreSQL) ----------------------------------------------------------------------------


@db_group.command("grant")
@click.argument("kind", metavar="reader|writer|admin")
@click.argument("role")
def grant(kind: str, role: str) -> None:
    """PostgreSQL: make the database login ROLE a reader, writer or admin of this catalog (its other role goes)."""
    change = get_registry().grant(kind, role)
    if change.previous == change.kind:
        output.message(f"{role} is already a {kind} of this catalog")
    else:
        output.message(
            f"{role} is now a {kind} of this catalog" + (f" (was {change.previous})" if change.previous else "")
        )


@db_group.command("revoke")
@click.argument("role")
def revoke(role: str) -> None:
    """PostgreSQL: take every role of this catalog from the database login ROLE."""
    change = get_registry().revoke(role)
    if change.previous is None:
        output.message(f"{role} has no role in this catalog")
    else:
        output.message(f"{role} is no longer a {change.previous} of this catalog")


@db_group.command("roles")
@json_option
def roles(as_json: bool) -> None:
    """PostgreSQL: who is a reader, writer or admin of this catalog (and who owns its tables)."""
    members = [m.to_dict() for m in get_registry().role_members()]
    if as_json:
        output.print_json(members)
        return
    output.print_table(["role", "kind", "group role"], [(m["role"], m["kind"], m["group"]) for m in members])


# -- expert aliases --------------------------------------------------------------------------------


@main.command("alias-expert")
@click.argument("ref", metavar="NAME@VERSION")
@click.argument("alias")
def alias_expert(ref: str, alias: str) -> None:
    """Point ALIAS (e.g. stable) at an expert version; an existing alias moves. NAME@ALIAS then
    works wherever an expert reference does (show, compose --expert, ...)."""
    record = get_registry().set_expert_alias(ref, alias)
    if not record.changed:
        output.message(f"{record.ref} already points at {record.target}")
    else:
        moved = f" (was {record.name}@{record.previous})" if record.previous is not None else ""
        output.message(f"{record.ref} -> {record.target}{moved}")


@main.command("expert-aliases")
@click.argument("name", required=False)
@json_option
def expert_aliases(name: str | None, as_json: bool) -> None:
    """The expert aliases (of NAME) and the versions they point at."""
    records = [r.to_dict() for r in get_registry().expert_aliases(name)]
    if as_json:
        output.print_json(records)
        return
    if not records:
        output.message("No expert aliases yet: set one with atmoe-reg alias-expert NAME@VERSION ALIAS")
        return
    output.print_table(["alias", "expert"], [(r["alias"], r["target"]) for r in records])
