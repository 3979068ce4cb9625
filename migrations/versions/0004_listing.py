"""listing: full-text search of experts (list --search), and PostgreSQL's bytewise listing order

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-10

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).

The search index is made per engine, beside the tables of models.py (registry/search.py says what
it holds; Alembic's comparison skips these objects, search.is_search_object):

- SQLite: the FTS5 table experts_search (rowid = experts.id) and three triggers on experts that
  keep it in step. A later batch migration of experts (copy, drop, rename) drops those triggers
  with the old table: it must create them again (sqlite_triggers below, copied into it).
- PostgreSQL: the immutable SQL function experts_search_document(...), a GIN index on its
  to_tsvector('simple', ...), and the index ix_experts_listing on (name COLLATE "C", version),
  so that listings sort bytewise, as on SQLite, and page through an index.

Raw DDL goes through exec_driver_sql: SQLAlchemy's text() would read ":punct:" as a bind parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sqlite_document(row: str) -> str:
    """The FTS5 columns (name, description, labels, tags) of experts row ``row`` (NEW or experts)."""
    return (
        f"{row}.name, coalesce({row}.description, ''), "
        f"trim(coalesce({row}.domain, '') || ' ' || coalesce({row}.style, '')), "
        f"coalesce((SELECT group_concat(key || ' ' || value, ' ') "
        f"FROM json_each(CASE WHEN json_valid({row}.tags) THEN {row}.tags ELSE '{{}}' END)), '')"
    )


SQLITE_TABLE = (
    "CREATE VIRTUAL TABLE experts_search USING fts5("
    "name, description, labels, tags, tokenize = 'unicode61 remove_diacritics 0')"
)
SQLITE_INSERT = "INSERT INTO experts_search (rowid, name, description, labels, tags)"


def sqlite_triggers() -> list[str]:
    return [
        f"CREATE TRIGGER experts_search_insert AFTER INSERT ON experts BEGIN "
        f"{SQLITE_INSERT} VALUES (NEW.id, {_sqlite_document('NEW')}); END",
        "CREATE TRIGGER experts_search_delete AFTER DELETE ON experts BEGIN "
        "DELETE FROM experts_search WHERE rowid = OLD.id; END",
        f"CREATE TRIGGER experts_search_update AFTER UPDATE ON experts BEGIN "
        f"DELETE FROM experts_search WHERE rowid = OLD.id; "
        f"{SQLITE_INSERT} VALUES (NEW.id, {_sqlite_document('NEW')}); END",
    ]


PG_FUNCTION = """
CREATE FUNCTION experts_search_document(name text, description text, domain text, style text, tags json)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(
        concat_ws(' ', name, description, domain, style,
                  CASE WHEN json_typeof(tags) = 'object'
                       THEN (SELECT string_agg(key || ' ' || value, ' ') FROM json_each_text(tags)) END),
        '[[:punct:]]', ' ', 'g')
$$
"""
PG_SEARCH_INDEX = (
    "CREATE INDEX ix_experts_search ON experts USING gin "
    "(to_tsvector('simple'::regconfig, experts_search_document(name, description, domain, style, tags)))"
)
PG_LISTING_INDEX = 'CREATE INDEX ix_experts_listing ON experts (name COLLATE "C", version)'


def _execute(*statements: str) -> None:
    connection = op.get_bind()
    for statement in statements:
        connection.exec_driver_sql(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # backfill first, then the triggers keep it in step
        _execute(
            SQLITE_TABLE,
            f"{SQLITE_INSERT} SELECT experts.id, {_sqlite_document('experts')} FROM experts",
            *sqlite_triggers(),
        )
    elif dialect == "postgresql":
        _execute(PG_FUNCTION, PG_SEARCH_INDEX, PG_LISTING_INDEX)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _execute(
            "DROP TRIGGER IF EXISTS experts_search_insert",
            "DROP TRIGGER IF EXISTS experts_search_delete",
            "DROP TRIGGER IF EXISTS experts_search_update",
            "DROP TABLE IF EXISTS experts_search",
        )
    elif dialect == "postgresql":
        _execute(
            "DROP INDEX IF EXISTS ix_experts_listing",
            "DROP INDEX IF EXISTS ix_experts_search",
            "DROP FUNCTION IF EXISTS experts_search_document(text, text, text, text, json)",
        )
