"""The ``atmoe-reg`` group: global options, the lazily opened Registry, and error translation.

Command modules register on ``main``::

    from atmoe.cli.app import get_registry, main

    @main.command("thing")
    @click.option("--json", "as_json", is_flag=True)
    def thing(as_json: bool) -> None:
        registry = get_registry()
        ...

and are imported by ``atmoe/cli/__init__.py``. Library errors are translated here, once:
``atmoe.errors.UsageError`` -> one line, exit 2; any other ``AtmoeError`` -> one line, exit 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click

from atmoe.cli import output
from atmoe.errors import AtmoeError, UsageError

if TYPE_CHECKING:
    from atmoe.registry.listing import Reader
    from atmoe.registry.registry import Registry

EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclass
class State:
    home: str | None = None
    db: str | None = None
    store: str | None = None
    registry: Registry | None = None
    schema_checked: bool = False


def one_line(text: str) -> str:
    """One line, control characters escaped (an error may quote catalog text or a file's bytes)."""
    from atmoe.cli.output import plain

    return plain(" ".join(str(text).split()))


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``Error: message`` as one line on stderr and exit with ``code``."""
    click.echo(f"Error: {one_line(message)}", err=True)
    raise click.exceptions.Exit(code)


def _click_usage(error: click.UsageError) -> NoReturn:
    hint = ""
    if error.ctx is not None:
        hint = f" (see '{error.ctx.command_path} --help')"
    fail(error.format_message() + hint, error.exit_code)


def _translate(error: Exception) -> NoReturn:
    if isinstance(error, UsageError):
        fail(str(error), EXIT_USAGE)
    if isinstance(error, AtmoeError):
        fail(str(error), EXIT_FAILURE)
    if isinstance(error, click.UsageError):
        _click_usage(error)
    if isinstance(error, click.ClickException):
        fail(error.format_message(), error.exit_code)
    if isinstance(error, OSError):
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        fail(f"{error.strerror or error}{where}", EXIT_FAILURE)
    if type(error).__module__.startswith(("sqlalchemy", "sqlite3", "psycopg")):  # or a driver's own, under list
        origin = getattr(error, "orig", None) or error
        fail(f"database error: {str(origin).splitlines()[0] if str(origin) else type(origin).__name__}")
    raise error


class AtmoeGroup(click.Group):
    """A click group whose known errors are one line: never a usage dump, never a traceback."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            _click_usage(error)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - translated or re-raised in _translate
            _translate(error)


def _state(ctx: click.Context | None = None) -> State:
    ctx = ctx or click.get_current_context()
    state = ctx.find_object(State)
    if state is None:  # a command invoked on its own, outside main
        state = ctx.find_root().ensure_object(State)
    return state


def get_registry(ctx: click.Context | None = None, *, check_schema: bool = True) -> Registry:
    """The Registry of this invocation, opened on first use (closed when the command ends).

    ``check_schema=False`` opens without creating or checking the schema (``db upgrade/current``).
    """
    ctx = ctx or click.get_current_context()
    state = _state(ctx)
    if state.registry is None:
        from atmoe.registry.registry import Registry

        state.registry = Registry.open(state.home, state.db, state.store, check_schema=check_schema, warn=output.warn)
        state.schema_checked = check_schema
        ctx.find_root().call_on_close(state.registry.close)
    elif check_schema and not state.schema_checked:
        from atmoe.registry import db

        db.ensure_schema(state.registry.engine)
        state.schema_checked = True
    return state.registry


def get_reader(ctx: click.Context | None = None) -> Reader:
    """A listing reader for this invocation (closed when the command ends): the catalog's own
    DB-API connection when it is healthy (``reader.open_reader``: no SQLAlchemy import, the cold
    start of ``list``), else a session of the Registry, opened and checked as for any command."""
    ctx = ctx or click.get_current_context()
    state = _state(ctx)
    if state.registry is None:
        from atmoe.registry.config import resolve
        from atmoe.registry.reader import open_reader

        reader = open_reader(resolve(state.home, state.db, state.store), warn=output.warn)
        if reader is not None:
            return ctx.find_root().with_resource(reader)
    return ctx.find_root().with_resource(get_registry(ctx).reader())


@click.group(cls=AtmoeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    envvar="ATMOE_HOME",
    show_envvar=True,
    metavar="DIR",
    help="Registry home holding registry.db and store/ (default ~/.atmoe).",
)
@click.option(
    "--db",
    "db_url",
    envvar="ATMOE_DB_URL",
    show_envvar=True,
    metavar="URL",
    help="SQLAlchemy database URL (default sqlite:///HOME/registry.db); postgresql+psycopg://... for a team.",
)
@click.option(
    "--store",
    envvar="ATMOE_STORE",
    show_envvar=True,
    metavar="DIR|URL",
    help="Blob store: a directory (default HOME/store), file:///DIR, or s3://BUCKET[/PREFIX] for a team (AWS settings).",
)
@click.option(
    "--allow-downloads",
    is_flag=True,
    envvar="ATMOE_ALLOW_DOWNLOADS",
    show_envvar=True,
    help="Let the Hugging Face Hub be asked for what the local cache lacks: a base model given as a hub id, "
    "an hf:// expert (off: only this machine's files and cache; HF_HUB_OFFLINE=1 keeps it off).",
)
@click.version_option(package_name="atmoe-registry", prog_name="atmoe-reg")
@click.pass_context
def main(ctx: click.Context, home: str | None, db_url: str | None, store: str | None, allow_downloads: bool) -> None:
    """Catalog LoRA experts, compose them into AT-MoE models, train and version their routers."""
    ctx.obj = State(home=home or None, db=db_url or None, store=store or None)
    if allow_downloads:  # read by atmoe.hub, the one place that decides whether the network may be reached
        os.environ["ATMOE_ALLOW_DOWNLOADS"] = "1"
