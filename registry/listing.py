"""The expert listing (``atmoe-reg list``): one filter, the SQL of a page and of a count, and rows.

The SQL is written here once, for SQLite and PostgreSQL, and runs on any ``Reader``: a plain DB-API
connection (``reader.CatalogReader``, what the command line uses, so that ``list`` never imports
SQLAlchemy) or a SQLAlchemy session (``experts.SessionReader``, the Python API). Rows are plain
dicts, ordered by name (bytewise, on both engines) and version.

    query = ExpertFilter.make(domain="cardiology", search="rigorous gastro")
    total = count(reader, query)
    rows = list(summaries(reader, query, limit=50, offset=0))

Paging is by LIMIT / OFFSET over the ``(name, version)`` index, which stays cheap at a team's
catalog sizes (100,000 rows: the last page costs a few milliseconds more than the first).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from atmoe.registry import search as search_index
from atmoe.registry.names import canonical_base_model, validate_name

SUMMARY_COLUMNS = (
    "name",
    "version",
    "group",
    "domain",
    "style",
    "tags",
    "base_model",
    "r",
    "alpha",
    "use_rslora",
    "digest",
    "size",
    "created_at",
    "created_by",
)
_SELECT = (
    "e.name, e.version, g.name, e.domain, e.style, CAST(e.tags AS TEXT), e.base_model, e.r, e.alpha, "
    "e.use_rslora, e.digest, e.size, e.created_at, e.created_by"
)
_FROM = "experts e JOIN groups g ON g.id = e.group_id"
# PostgreSQL sorts by the database's collation; "C" is bytewise, as SQLite sorts (ix_experts_listing)
_ORDER = {"sqlite": "e.name, e.version", "postgresql": 'e.name COLLATE "C", e.version'}


class Reader(Protocol):
    """Where a listing's SQL runs. ``dialect``: "sqlite" or "postgresql"; ``paramstyle``: "named"
    (``:name``) or "pyformat" (``%(name)s``)."""

    dialect: str
    paramstyle: str

    def execute(self, sql: str, params: Mapping[str, Any], *, stream: bool = False) -> Iterator[Sequence[Any]]:
        """The rows of one SELECT; ``stream``: fetched as they are read, not all at once."""
        ...


@dataclass(frozen=True)
class ExpertFilter:
    """Which experts a listing shows; every field given must match (AND). ``make`` checks the input."""

    group: str | None = None
    domain: str | None = None
    style: str | None = None
    base_model: str | None = None
    name: str | None = None
    tags: tuple[tuple[str, str | None], ...] = ()  # (key, value), or (key, None): the tag is set
    words: tuple[str, ...] = ()  # --search: every word must start a word of the expert's text

    @classmethod
    def make(
        cls,
        *,
        group: str | None = None,
        domain: str | None = None,
        style: str | None = None,
        tag: str | Sequence[str] | Mapping[str, str] | None = None,
        base_model: str | None = None,
        name: str | None = None,
        search: str | None = None,
    ) -> ExpertFilter:
        """``tag``: "K=V", "K", several of them, or a mapping; ``search``: free text (``search.py``)."""
        if isinstance(tag, Mapping):
            items = [f"{k}={v}" for k, v in tag.items()]
        elif isinstance(tag, str):
            items = [tag]
        else:
            items = list(tag or ())
        tags: list[tuple[str, str | None]] = []
        for item in items:
            key, sep, value = item.partition("=")
            tags.append((validate_name(key, "tag key"), value if sep else None))
        return cls(
            group=group,
            domain=domain,
            style=style,
            base_model=canonical_base_model(base_model) if base_model is not None else None,
            name=name,
            tags=tuple(tags),
            words=tuple(search_index.search_words(search)) if search is not None else (),
        )

    @property
    def narrows(self) -> bool:
        """Does it leave out any expert?"""
        return self != ExpertFilter()


# -- SQL -------------------------------------------------------------------------------------------


class _Params:
    """Bind parameters in the reader's style, numbered in order of use."""

    def __init__(self, paramstyle: str) -> None:
        if paramstyle not in ("named", "pyformat"):
            raise ValueError(f"paramstyle {paramstyle!r}: expected 'named' or 'pyformat'")
        self.style = paramstyle
        self.values: dict[str, Any] = {}

    def __call__(self, value: Any) -> str:
        key = f"p{len(self.values)}"
        self.values[key] = value
        return f":{key}" if self.style == "named" else f"%({key})s"


def _where(query: ExpertFilter, dialect: str, bind: _Params) -> str:
    clauses = [
        f"{column} = {bind(value)}"
        for column, value in (
            ("g.name", query.group),
            ("e.domain", query.domain),
            ("e.style", query.style),
            ("e.base_model", query.base_model),
            ("e.name", query.name),
        )
        if value is not None
    ]
    for key, value in query.tags:
        if dialect == "sqlite":
            tag = f"json_extract(e.tags, {bind(f'$.{json.dumps(key)}')})"
        else:
            tag = f"(e.tags ->> CAST({bind(key)} AS TEXT))"
        clauses.append(f"{tag} IS NOT NULL" if value is None else f"{tag} = {bind(value)}")
    if query.words:
        if dialect == "sqlite":
            clauses.append(
                f"e.id IN (SELECT rowid FROM {search_index.SEARCH_TABLE} "
                f"WHERE {search_index.SEARCH_TABLE} MATCH {bind(search_index.fts5_query(list(query.words)))})"
            )
        else:
            # the expression of ix_experts_search, word for word, so that the planner uses the index
            document = f"{search_index.SEARCH_FUNCTION}(e.name, e.description, e.domain, e.style, e.tags)"
            clauses.append(
                f"to_tsvector(CAST('simple' AS regconfig), {document}) @@ "
                f"to_tsquery(CAST('simple' AS regconfig), {bind(search_index.tsquery(list(query.words)))})"
            )
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def _dialect(reader: Reader) -> str:
    if reader.dialect not in _ORDER:
        raise ValueError(f"listing supports SQLite and PostgreSQL, not {reader.dialect!r}")
    return reader.dialect


def page_sql(
    query: ExpertFilter, *, dialect: str, paramstyle: str, limit: int | None = None, offset: int = 0
) -> tuple[str, dict[str, Any]]:
    """The SELECT of one page (every row from ``offset`` when ``limit`` is None), and its parameters."""
    bind = _Params(paramstyle)
    sql = f"SELECT {_SELECT} FROM {_FROM}{_where(query, dialect, bind)} ORDER BY {_ORDER[dialect]}"
    if limit is not None:
        sql += f" LIMIT {bind(limit)}"
    elif offset and dialect == "sqlite":
        sql += " LIMIT -1"  # SQLite takes no OFFSET without a LIMIT; -1 is none
    if offset:
        sql += f" OFFSET {bind(offset)}"
    return sql, bind.values


def _from(query: ExpertFilter) -> str:
    # every expert has its group (a foreign key, not null): the join only matters to filter by it
    return _FROM if query.group is not None else "experts e"


def count_sql(query: ExpertFilter, *, dialect: str, paramstyle: str) -> tuple[str, dict[str, Any]]:
    bind = _Params(paramstyle)
    return f"SELECT count(*) FROM {_from(query)}{_where(query, dialect, bind)}", bind.values


def ids_sql(query: ExpertFilter, *, dialect: str, paramstyle: str) -> tuple[str, dict[str, Any]]:
    """The ids of the matching experts (``experts.list_experts`` loads their rows)."""
    bind = _Params(paramstyle)
    return f"SELECT e.id FROM {_from(query)}{_where(query, dialect, bind)}", bind.values


# -- running it ------------------------------------------------------------------------------------


def count(reader: Reader, query: ExpertFilter) -> int:
    """How many experts (versions) match."""
    sql, params = count_sql(query, dialect=_dialect(reader), paramstyle=reader.paramstyle)
    return int(next(iter(reader.execute(sql, params)))[0])


def summaries(
    reader: Reader, query: ExpertFilter, *, limit: int | None = None, offset: int = 0, stream: bool = False
) -> Iterator[dict[str, Any]]:
    """The matching experts as plain dicts (``SUMMARY_COLUMNS``), ``limit`` of them from ``offset``
    (every one when ``limit`` is None). ``stream``: rows are fetched while they are consumed."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    sql, params = page_sql(query, dialect=_dialect(reader), paramstyle=reader.paramstyle, limit=limit, offset=offset)
    decode = _RowDecoder()
    for row in reader.execute(sql, params, stream=stream):
        yield decode(row)


class _RowDecoder:
    """One row of ``_SELECT`` as a dict. Tags come back as JSON text and are decoded once per
    distinct value (teams reuse a few tag sets), each row getting its own dict; SQLite hands back
    times as text, naive, which are UTC."""

    def __init__(self) -> None:
        self._tags: dict[str, dict[str, Any]] = {}

    def tags(self, raw: str | None) -> dict[str, Any]:
        key = raw or "{}"
        tags = self._tags.get(key)
        if tags is None:
            tags = self._tags[key] = json.loads(key)
        return dict(tags)

    def __call__(self, row: Sequence[Any]) -> dict[str, Any]:
        name, version, group, domain, style, tags, base_model, r, alpha, rslora, digest, size, created, by = row
        if isinstance(created, str):
            created = datetime.fromisoformat(created)
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        return {
            "name": name,
            "version": version,
            "group": group,
            "domain": domain,
            "style": style,
            "tags": self.tags(tags),
            "base_model": base_model,
            "r": r,
            "alpha": float(alpha) if alpha is not None else None,
            "use_rslora": bool(rslora),
            "digest": digest,
            "size": size,
            "created_at": created,
            "created_by": by,
        }
