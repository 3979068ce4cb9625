"""A catalog opened for reading with its DB-API driver alone (sqlite3, psycopg), without SQLAlchemy.

``atmoe-reg list`` spends most of a cold start importing SQLAlchemy (about 0.2 s, twice what the
rest of the command costs); ``open_reader`` lets it skip that on a healthy catalog. It opens the
catalog only where ``Registry.open`` would have nothing to do but connect: the database exists and
is at the schema head, and its store is marked. Anything else (a new database, an older or unknown
schema, an unmarked store, a URL of another driver or with options this module does not read)
returns None, and the caller opens the ``Registry`` instead, which creates, refuses or reports
exactly as for any other command. A database that cannot be reached at all raises the driver's error.

The URL is read as SQLAlchemy reads it (``_parse_url``, ``translate_connect_args``, and the psycopg
dialect's ``create_connect_args``: ``tests/test_listing.py`` compares them), for
``sqlite[+pysqlite]:///FILE`` and ``postgresql+psycopg://...`` only.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from atmoe.registry.config import Settings
from atmoe.registry.db import BUSY_TIMEOUT_MS, HEAD
from atmoe.registry.netfs import warn_network_filesystem
from atmoe.registry.store import BlobStore

# sqlalchemy.engine.url._parse_url's pattern, unchanged
_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)
STREAM_ROWS = 2000  # rows per fetch of a streamed PostgreSQL listing (a server-side cursor)


def _parts(url: str) -> dict[str, Any] | None:
    match = _URL.match(url)
    if match is None:
        return None
    parts: dict[str, Any] = match.groupdict()
    for key in ("username", "password", "database"):
        if parts[key] is not None:
            parts[key] = unquote(parts[key])
    parts["host"] = parts.pop("ipv4host") or parts.pop("ipv6host")
    return parts


def sqlite_file(url: str) -> Path | None:
    """The file of ``sqlite[+pysqlite]:///FILE`` (no query), else None."""
    parts = _parts(url)
    if parts is None or parts["name"] not in ("sqlite", "sqlite+pysqlite") or parts["query"] is not None:
        return None
    database = parts["database"]
    if parts["host"] or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def psycopg_connect_args(url: str) -> dict[str, Any] | None:
    """The keyword arguments of ``psycopg.connect`` for a ``postgresql+psycopg://`` URL, as
    SQLAlchemy would pass them; None for any other URL, or one with a repeated query key (several
    hosts), which SQLAlchemy rewrites."""
    parts = _parts(url)
    if parts is None or parts["name"] != "postgresql+psycopg":
        return None
    args: dict[str, Any] = {}
    for part, key in (("host", "host"), ("database", "dbname"), ("username", "user"), ("password", "password")):
        if parts[part]:
            args[key] = parts[part]
    if parts["port"]:
        try:
            args["port"] = int(parts["port"])
        except ValueError:
            return None
    if parts["query"] is not None:
        pairs = parse_qsl(parts["query"])
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            return None
        args.update(pairs)
    return args


class CatalogReader:
    """A listing ``Reader`` (``listing.py``) on a DB-API connection. Every query of one reader runs
    in one read transaction, so a page and its count agree."""

    def __init__(self, connection: Any, dialect: str) -> None:
        self.connection = connection
        self.dialect = dialect
        self.paramstyle = "named" if dialect == "sqlite" else "pyformat"
        self._streams = 0
        if dialect == "sqlite":  # autocommit mode (isolation_level=None): the transaction is ours
            connection.execute("BEGIN")

    def execute(self, sql: str, params: Mapping[str, Any], *, stream: bool = False) -> Iterator[Sequence[Any]]:
        if stream and self.dialect == "postgresql":
            self._streams += 1
            cursor = self.connection.cursor(name=f"atmoe_listing_{self._streams}")
            cursor.itersize = STREAM_ROWS
        else:
            cursor = self.connection.cursor()  # sqlite3 steps through the rows as they are read
        try:
            cursor.execute(sql, dict(params))
            yield from cursor
        finally:
            cursor.close()

    def close(self) -> None:
        try:
            self.connection.rollback()  # read only: nothing to commit
        finally:
            self.connection.close()

    def __enter__(self) -> CatalogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _head_revision(connection: Any) -> bool:
    cursor = connection.cursor()
    try:
        cursor.execute("SELECT version_num FROM alembic_version")
        return [row[0] for row in cursor.fetchall()] == [HEAD]
    finally:
        cursor.close()


def _connect(settings: Settings) -> tuple[Any, str, Path | None] | None:
    database = sqlite_file(settings.db_url)
    if database is not None:
        if not database.is_file() or database.stat().st_size == 0:
            return None  # new: Registry.open creates it
        return sqlite3.connect(database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None), "sqlite", database
    args = psycopg_connect_args(settings.db_url)
    if args is None:
        return None
    try:
        import psycopg
    except ImportError:  # Registry.open names the missing driver
        return None
    # a server that refuses or cannot be reached would refuse Registry.open alike: its error is
    # raised here (the command line reports it as it reports SQLAlchemy's), not met twice
    return psycopg.connect("", **args), "postgresql", None


def open_reader(settings: Settings, *, warn: Callable[[str], None] | None = None) -> CatalogReader | None:
    """A reader on the catalog of ``settings`` when it is at the schema head with a marked store,
    else None (open the ``Registry`` instead). ``warn`` gets the network-filesystem warning of a
    SQLite database, as ``Registry.open`` gives it. A bucket store is always left to the ``Registry``
    (its marker is an object to fetch, its client a heavy import)."""
    if not isinstance(settings.store, Path):
        return None
    settings.home.mkdir(parents=True, exist_ok=True)
    opened = _connect(settings)
    if opened is None:
        return None
    connection, dialect, database = opened
    store = BlobStore(settings.store)
    try:
        usable = _head_revision(connection) and store.catalog_id() is not None
    except Exception:  # noqa: BLE001 - no alembic_version table, a locked or damaged file...
        usable = False
    if not usable:
        connection.close()
        return None
    try:
        store.ensure()
        if database is not None:
            warn_network_filesystem(database, warn or (lambda _message: None))
        return CatalogReader(connection, dialect)
    except BaseException:
        connection.close()
        raise
