"""Database engine and schema management.

- SQLite: WAL, ``busy_timeout=30000``, ``foreign_keys=ON``; pysqlite's own transaction handling is
  switched off and every transaction is begun by us (SQLAlchemy's documented recipe), as
  ``BEGIN IMMEDIATE`` on the write engine so that two writers queue instead of failing on upgrade.
  A database on a network filesystem gets a warning pointing to PostgreSQL (``netfs.py``).
- Schema: Alembic revisions in ``atmoe.migrations``. ``ensure_schema`` creates a blank database at
  head and refuses an older one (run ``atmoe-reg db upgrade``) or an unknown one (newer tool). The
  check reads ``alembic_version`` with plain SQL, so that everyday commands do not import Alembic.

SQLAlchemy is imported inside the functions: ``KNOWN_REVISIONS`` and ``HEAD`` are read by the
command line's listing, which opens the catalog without SQLAlchemy (``reader.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atmoe.errors import PermissionDenied, SchemaMismatch
from atmoe.registry.netfs import default_warn, warn_network_filesystem

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["default_warn", "warn_network_filesystem"]  # re-exported: Registry.open takes them from here

# Every revision this tool knows, oldest first (tests/test_migrations.py checks this against Alembic).
KNOWN_REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD = KNOWN_REVISIONS[-1]
REGISTRY_TABLES = frozenset(
    {
        "groups",
        "experts",
        "expert_files",
        "compositions",
        "composition_experts",
        "routers",
        "router_aliases",
        "catalog_identity",
        "evaluations",
        "expert_aliases",
        "events",
    }
)
UPGRADE_HINT = "run atmoe-reg db upgrade"
BUSY_TIMEOUT_MS = 30_000
_PG_UPGRADE_LOCK = 0x61746D6F65  # "atmoe": serialises concurrent upgrades on PostgreSQL
_PG_BLOB_LOCK = 0x61746D6F62  # "atmob": writers that reference blobs (shared) against gc (exclusive)

# -- engines -------------------------------------------------------------------------------------


def next_value(session: Any, column: Any, *criteria: Any) -> int:
    """1 + the largest value of ``column`` among rows matching ``criteria`` (1 when none).

    Used for version and router numbers; a unique constraint guards them, and callers retry the
    transaction on IntegrityError (see Registry.transact), which also works on PostgreSQL.
    """
    from sqlalchemy import func, select

    return (session.scalar(select(func.max(column)).where(*criteria)) or 0) + 1


def is_sqlite(engine_or_url: Engine | str) -> bool:
    from sqlalchemy.engine import make_url

    url = make_url(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url.url
    return url.get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, None for an in-memory database."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _install_sqlite_events(engine: Engine, *, wal: bool) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of pysqlite's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _create_with_umask(path: Path) -> None:
    """Create a new SQLite file as 0666 minus the umask (SQLite itself would make it 0644 minus the
    umask, never group-writable); its -wal and -shm files then take the same mode from it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        pass


def create_registry_engine(
    url: str,
    *,
    warn: Callable[[str], None] | None = default_warn,
    detect_network_fs: Callable[[Path], str | None] | None = None,
) -> Engine:
    """An engine for ``url``; SQLite gets its pragmas and our transaction handling.

    ``detect_network_fs`` (default: ``network_filesystem``, looked up at call time so tests can
    replace it) names the network filesystem a SQLite file lies on, or returns None.
    """
    from sqlalchemy import create_engine

    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)
    path = sqlite_path(url)
    remote = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_with_umask(path)
        remote = warn_network_filesystem(path, warn or (lambda _m: None), detect_network_fs)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    # WAL needs shared memory between processes, which network filesystems do not provide.
    _install_sqlite_events(engine, wal=path is not None and remote is None)
    return engine


def lock_blobs(session: Any, *, exclusive: bool) -> None:
    """Take the blob-reference lock for the rest of this write transaction (the gc protocol).

    Writers that commit rows referencing blobs take it shared, gc takes it exclusive while it
    re-checks references and deletes. SQLite: every write transaction already holds the database's
    write lock from its first statement (BEGIN IMMEDIATE), which serialises them all; nothing more
    is needed. PostgreSQL: a transaction-scoped advisory lock, released at commit or rollback, so it
    holds across processes and machines that share the database.
    """
    from sqlalchemy import text

    if session.get_bind().dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        session.execute(text(f"SELECT {function}(:key)"), {"key": _PG_BLOB_LOCK})
    else:  # make sure the IMMEDIATE transaction has begun, so the write lock is held from here on
        session.execute(text("SELECT 1"))


def write_engine(engine: Engine) -> Engine:
    """The same engine (and pool) whose transactions take the write lock first on SQLite."""
    if is_sqlite(engine):
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


# -- schema ----------------------------------------------------------------------------------------


def _check_schema_visible(connection: Connection) -> None:
    """PostgreSQL: a role without USAGE on any schema of its search_path sees no table at all, and
    would take the catalog for a blank database; say what it lacks instead."""
    if connection.dialect.name != "postgresql":
        return
    from sqlalchemy import text

    schema, user = connection.execute(text("SELECT current_schema(), session_user")).one()
    if schema is None:
        raise PermissionDenied(
            f"database role {user!r} may use no schema of this database, so it has no role in this catalog "
            f"(an admin runs: atmoe-reg db grant reader {user})"
        )


def current_revision(connection: Connection) -> str | None:
    """The Alembic revision of the database, None for a database without one."""
    from sqlalchemy import inspect, text

    _check_schema_visible(connection)
    if not inspect(connection).has_table("alembic_version"):
        return None
    revisions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(revisions) > 1:
        raise SchemaMismatch(f"database has several schema heads {sorted(revisions)}; it was not made by atmoe-reg")
    return revisions[0] if revisions else None


def _has_registry_tables(connection: Connection) -> bool:
    from sqlalchemy import inspect

    return bool(REGISTRY_TABLES & set(inspect(connection).get_table_names()))


def _unknown(revision: str) -> SchemaMismatch:
    return SchemaMismatch(
        f"database schema revision {revision!r} is unknown to this atmoe-reg (it knows up to {HEAD}); "
        "it was written by a newer version: upgrade atmoe-registry"
    )


def check_revision(connection: Connection) -> str | None:
    """Raise SchemaMismatch unless the database is at head or blank; return its revision."""
    revision = current_revision(connection)
    if revision == HEAD:
        return revision
    if revision is None:
        if _has_registry_tables(connection):
            raise SchemaMismatch("database has registry tables but no schema revision; it was not made by atmoe-reg")
        return None
    if revision in KNOWN_REVISIONS:
        raise SchemaMismatch(f"database schema is at revision {revision}, this atmoe-reg needs {HEAD}: {UPGRADE_HINT}")
    raise _unknown(revision)


def is_blank(engine: Engine) -> bool:
    """No registry schema yet (a new database: ``ensure_schema`` would create it)."""
    with engine.connect() as connection:
        _check_schema_visible(connection)
        return not _has_registry_tables(connection) and current_revision(connection) is None


def ensure_schema(engine: Engine) -> str:
    """Create a blank database at head; refuse an older or unknown schema. Returns the revision."""
    with engine.connect() as connection:
        revision = check_revision(connection)
    if revision == HEAD:
        return revision
    upgrade(engine)
    return HEAD


def alembic_config(connection: Connection | None = None) -> Any:
    """Alembic Config built in code; migrations run on ``connection`` when one is given."""
    from alembic.config import Config

    import atmoe.migrations

    script_location = Path(atmoe.migrations.__file__).parent
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection for migrations, in one transaction that holds the write lock.

    On SQLite, foreign keys are switched off first (the pragma is ignored inside a transaction):
    batch migrations copy a table and DROP the old one, and with foreign keys on, that DROP would
    cascade-delete the rows that reference it. ``PRAGMA foreign_key_check`` runs before commit.
    """
    from sqlalchemy import text

    with write_engine(engine).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        driver = connection.connection.driver_connection if sqlite else None
        if driver is not None:
            driver.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK})
                yield connection
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise SchemaMismatch(
                            f"migration left {len(broken)} rows with broken foreign keys "
                            f"(first in table {broken[0][0]}); nothing was changed"
                        )
        finally:
            if driver is not None:
                driver.execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the schema to ``target`` in one transaction; returns (before, after)."""
    from alembic import command

    with _migrating(engine) as connection:
        before = current_revision(connection)
        if before is not None and before not in KNOWN_REVISIONS:
            raise _unknown(before)
        if before is None and _has_registry_tables(connection):
            raise SchemaMismatch("database has registry tables but no schema revision; it was not made by atmoe-reg")
        if before == HEAD and target == "head":
            return before, before
        command.upgrade(alembic_config(connection), target)
        after = current_revision(connection)
    return before, after


def downgrade(engine: Engine, target: str) -> tuple[str | None, str | None]:
    """Downgrade the schema (tests and recovery only)."""
    from alembic import command

    with _migrating(engine) as connection:
        before = current_revision(connection)
        command.downgrade(alembic_config(connection), target)
        after = current_revision(connection)
    return before, after
