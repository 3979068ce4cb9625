"""``init`` and ``db upgrade|current``."""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main


@main.command("init")
@click.option("--json", "as_json", is_flag=True, help="Print the registry's locations as JSON.")
def init(as_json: bool) -> None:
    """Create the registry home, store and database (idempotent)."""
    registry = get_registry()
    info = registry.info()
    if as_json:
        output.print_json(info)
        return
    output.message(f"Registry ready: database {info['db_url']} (schema {info['revision']}), store {info['store']}")


@main.group("db")
def db_group() -> None:
    """Database schema: upgrade, current revision."""


@db_group.command("upgrade")
def upgrade() -> None:
    """Upgrade the database schema to the one this tool needs."""
    registry = get_registry(check_schema=False)
    before, after = registry.upgrade()
    if before == after:
        output.message(f"Database already at schema {after} (head)")
    else:
        output.message(f"Upgraded database schema from {before or 'empty'} to {after}")


@db_group.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def current(as_json: bool) -> None:
    """Print the database's schema revision."""
    from atmoe.registry.db import HEAD, KNOWN_REVISIONS

    registry = get_registry(check_schema=False)
    revision = registry.current_revision()
    if as_json:
        output.print_json({"revision": revision, "head": HEAD, "is_head": revision == HEAD})
        return
    if revision is None:
        click.echo("none (empty database; any command creates it at head)")
    elif revision == HEAD:
        click.echo(f"{revision} (head)")
    elif revision in KNOWN_REVISIONS:
        click.echo(f"{revision} (head is {HEAD}: run atmoe-reg db upgrade)")
    else:
        click.echo(f"{revision} (unknown to this atmoe-reg, whose head is {HEAD})")
