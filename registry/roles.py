"""Roles on PostgreSQL: reader, writer, admin, enforced by the database's own privileges.

Each catalog (database, and schema when not ``public``) has three NOLOGIN group roles,
``atmoe_<database>_reader``, ``..._writer`` and ``..._admin``; ``grant`` makes a login role a member of
one of them. The privileges come from ``TABLE_PRIVILEGES``, the one definition of who may write what:

- a reader SELECTs every table: it lists, shows, verifies, builds, routes, generates, exports, reads
  the log;
- a writer also INSERTs: it adds experts and groups, composes, trains and evaluates routers, imports,
  and sets a *new* alias (router or expert);
- an admin also DELETEs and UPDATEs: it removes experts and compositions, moves aliases, runs
  ``gc --apply`` (which locks the ``catalog_identity`` row FOR UPDATE, a privilege only admins hold), and
  grants roles (admins hold the group roles WITH ADMIN OPTION).

Nobody but the tables' owner may UPDATE or DELETE ``events``, and its triggers refuse even the owner.
The tool checks the privileges an operation needs (``require``) before it writes anything, blobs
included, so a refused add leaves nothing behind; the database refuses the same writes on its own when
the tool is bypassed. SQLite has no roles: whoever can write the database file can change the catalog.

Roles are objects of the whole server: the first ``grant`` (run by the owner of the catalog's tables
with CREATEROLE, or by a superuser) creates the group roles and grants their privileges; later grants
by the owner apply them again (tables a newer schema added included).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from atmoe.errors import PermissionDenied, UsageError
from atmoe.registry import events

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry

KINDS = ("reader", "writer", "admin")  # each holds the privileges of the ones before it
SELECT, INSERT, UPDATE, DELETE = "SELECT", "INSERT", "UPDATE", "DELETE"
_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
_INSUFFICIENT_PRIVILEGE = "42501"

# Every table of the catalog and what each role adds on it to the role below (tests/test_roles.py
# checks that every table is listed): a new table is nobody's until it is classified here.
TABLE_PRIVILEGES: dict[str, dict[str, tuple[str, ...]]] = {
    "alembic_version": {"reader": (SELECT,)},
    "catalog_identity": {"reader": (SELECT,), "admin": (UPDATE,)},  # gc --apply locks the row FOR UPDATE
    "groups": {"reader": (SELECT,), "writer": (INSERT,)},
    "experts": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "expert_files": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "expert_aliases": {"reader": (SELECT,), "writer": (INSERT,), "admin": (UPDATE, DELETE)},
    "compositions": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "composition_experts": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "routers": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "router_aliases": {"reader": (SELECT,), "writer": (INSERT,), "admin": (UPDATE, DELETE)},
    "evaluations": {"reader": (SELECT,), "writer": (INSERT,), "admin": (DELETE,)},
    "events": {"reader": (SELECT,), "writer": (INSERT,)},  # append-only, for everyone
}

# What each operation writes (every one also logs an event); ``require`` checks these first.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "add experts": (("experts", INSERT), ("expert_files", INSERT)),
    "add groups": (("groups", INSERT),),
    "compose": (("compositions", INSERT), ("composition_experts", INSERT)),
    "train routers": (("routers", INSERT),),
    "evaluate routers": (("evaluations", INSERT),),
    "import archives": tuple(
        (table, INSERT)
        for table in (
            "groups",
            "experts",
            "expert_files",
            "compositions",
            "composition_experts",
            "routers",
            "router_aliases",
        )
    ),  # fmt: skip
    "set a new router alias": (("router_aliases", INSERT),),
    "move a router alias": (("router_aliases", UPDATE),),
    "set a new expert alias": (("expert_aliases", INSERT),),
    "move an expert alias": (("expert_aliases", UPDATE),),
    "remove experts": (("experts", DELETE), ("expert_files", DELETE), ("expert_aliases", DELETE)),
    "remove compositions": (
        ("compositions", DELETE),
        ("composition_experts", DELETE),
        ("routers", DELETE),
        ("router_aliases", DELETE),
        ("evaluations", DELETE),
    ),  # fmt: skip
    "run gc --apply": (("catalog_identity", UPDATE),),
}


def held_by(kind: str) -> dict[str, set[str]]:
    """Every privilege ``kind`` holds, its own and those of the kinds before it: {table: {privilege}}."""
    held: dict[str, set[str]] = {}
    for level in KINDS[: KINDS.index(kind) + 1]:
        for table, by_kind in TABLE_PRIVILEGES.items():
            held.setdefault(table, set()).update(by_kind.get(level, ()))
    return held


def kind_for(operation: str) -> str:
    """The least role that may do ``operation`` (one of ``NEEDS``)."""
    needs = (*NEEDS[operation], ("events", INSERT))
    for kind in KINDS:
        held = held_by(kind)
        if all(privilege in held.get(table, ()) for table, privilege in needs):
            return kind
    raise AssertionError(f"no role may {operation}")  # pragma: no cover - TABLE_PRIVILEGES is incomplete


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _session_user(session: Session) -> str:
    return str(session.execute(text("SELECT session_user")).scalar_one())


def require(session: Session, operation: str) -> None:
    """Raise PermissionDenied unless this database role may ``operation`` (a key of ``NEEDS``).

    PostgreSQL only (SQLite has no roles); called before anything is written, so that a refused
    operation leaves no blob and no row behind.
    """
    if not is_postgresql(session):
        return
    needs = (*NEEDS[operation], ("events", INSERT))
    columns = ", ".join(f"has_table_privilege(:table{i}, :privilege{i})" for i in range(len(needs)))
    values = {f"table{i}": table for i, (table, _) in enumerate(needs)}
    values.update({f"privilege{i}": privilege for i, (_, privilege) in enumerate(needs)})
    if all(session.execute(text(f"SELECT {columns}"), values).one()):
        return
    user, kind = _session_user(session), kind_for(operation)
    raise PermissionDenied(
        f"database role {user!r} may not {operation} in this catalog: that takes the {kind} role "
        f"(an admin runs: atmoe-reg db grant {kind} {user})"
    )


def denied(error: BaseException) -> PermissionDenied | None:
    """The PermissionDenied of a database error that is one (SQLSTATE 42501), else None."""
    origin = getattr(error, "orig", None)
    if (getattr(origin, "sqlstate", None) or getattr(origin, "pgcode", None)) != _INSUFFICIENT_PRIVILEGE:
        return None
    reason = (str(origin).splitlines() or ["permission denied"])[0]
    return PermissionDenied(f"the database refused: {reason} (see atmoe-reg db roles)")


# -- group roles -----------------------------------------------------------------------------------


def no_roles_on_sqlite() -> UsageError:
    return UsageError(
        "SQLite has no roles: whoever can write the database file can change the catalog; for reader, "
        "writer and admin roles share the catalog in PostgreSQL (--db postgresql+psycopg://...)"
    )


def group_role_names(database: str, schema: str = "public") -> dict[str, str]:
    """{kind: group role} of the catalog in ``database`` (and ``schema``):
    ``atmoe_<database>[_<schema>]_<kind>``, of lower-case letters, digits and ``_``; a name that had to
    change (or be cut to PostgreSQL's 63 characters) ends in a hash of the original instead, so that
    two catalogs on one server never share a role."""
    original = database if schema == "public" else f"{database}_{schema}"
    base = re.sub(r"[^a-z0-9_]", "_", original.lower())
    if base != original or len(base) > 48:
        base = f"{base[:39]}_{hashlib.sha256(original.encode()).hexdigest()[:8]}"
    return {kind: f"atmoe_{base}_{kind}" for kind in KINDS}


def role_names(session: Session) -> dict[str, str]:
    """{kind: group role} of the catalog this session works on (``group_role_names``)."""
    database, schema = session.execute(text("SELECT current_database(), current_schema()")).one()
    return group_role_names(str(database), str(schema))


def _quote(session: Session, name: str) -> str:
    return session.get_bind().dialect.identifier_preparer.quote_identifier(name)


def _existing(session: Session, names: Iterable[str]) -> set[str]:
    rows = session.execute(text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(names)})
    return {row[0] for row in rows}


def _owns_catalog(session: Session) -> bool:
    """Is this role a superuser, or (a member of) the owner of the catalog's tables?"""
    owner = session.execute(
        text("SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'experts'")
    ).scalar()
    if owner is None:  # pragma: no cover - ensure_schema made the tables
        return False
    return bool(session.execute(text("SELECT pg_has_role(current_user, :owner, 'MEMBER')"), {"owner": owner}).scalar())


def _set_up(session: Session, names: dict[str, str]) -> None:
    """Create the missing group roles and (re)grant exactly their privileges (by the catalog's owner)."""
    q = {kind: _quote(session, name) for kind, name in names.items()}
    missing = [names[kind] for kind in KINDS if names[kind] not in _existing(session, names.values())]
    if missing:
        may_create = session.execute(
            text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).scalar()
        if not may_create:
            raise PermissionDenied(
                f"creating this catalog's roles ({', '.join(missing)}) takes CREATEROLE: run the first "
                "atmoe-reg db grant as a role that has it, or as a superuser"
            )
        for name in missing:
            session.execute(text(f"CREATE ROLE {_quote(session, name)} NOLOGIN"))
    session.execute(text(f"GRANT {q['reader']} TO {q['writer']}"))
    session.execute(text(f"GRANT {q['writer']}, {q['reader']} TO {q['admin']} WITH ADMIN OPTION"))
    # each table of the catalog here, with the sequence of its id column if it has one
    tables = session.execute(
        text(
            "SELECT t.tablename, (SELECT pg_get_serial_sequence(format('%I.%I', c.table_schema, c.table_name), 'id') "
            "FROM information_schema.columns c WHERE c.table_schema = t.schemaname AND c.table_name = t.tablename "
            "AND c.column_name = 'id') FROM pg_tables t WHERE t.schemaname = current_schema()"
        )
    ).all()
    for table, sequence in sorted((name, seq) for name, seq in tables if name in TABLE_PRIVILEGES):
        quoted = _quote(session, table)
        session.execute(text(f"REVOKE ALL ON {quoted} FROM {q['reader']}, {q['writer']}, {q['admin']}"))
        for kind, privileges in TABLE_PRIVILEGES[table].items():
            session.execute(text(f"GRANT {', '.join(privileges)} ON {quoted} TO {q[kind]}"))
        if sequence is not None:  # nextval() for the ids of new rows: only for those who insert
            session.execute(text(f"REVOKE ALL ON SEQUENCE {sequence} FROM {q['writer']}"))
            if INSERT in TABLE_PRIVILEGES[table].get("writer", ()):
                session.execute(text(f"GRANT USAGE ON SEQUENCE {sequence} TO {q['writer']}"))
    schema_ok, connect_ok = session.execute(
        text(
            "SELECT has_schema_privilege(:role, current_schema(), 'USAGE'), "
            "has_database_privilege(:role, current_database(), 'CONNECT')"
        ),
        {"role": names["reader"]},
    ).one()
    if not schema_ok:
        session.execute(text(f"GRANT USAGE ON SCHEMA {_quote(session, _schema(session))} TO {q['reader']}"))
    if not connect_ok:
        session.execute(text(f"GRANT CONNECT ON DATABASE {_quote(session, _database(session))} TO {q['reader']}"))


def _schema(session: Session) -> str:
    return str(session.execute(text("SELECT current_schema()")).scalar_one())


def _database(session: Session) -> str:
    return str(session.execute(text("SELECT current_database()")).scalar_one())


def _memberships(session: Session, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """(member, kind, grantor) of every direct member of the group roles but the group roles."""
    kinds = {name: kind for kind, name in names.items()}
    rows = session.execute(
        text(
            "SELECT m.rolname, g.rolname, r.rolname FROM pg_auth_members a "
            "JOIN pg_roles g ON g.oid = a.roleid JOIN pg_roles m ON m.oid = a.member "
            "LEFT JOIN pg_roles r ON r.oid = a.grantor "
            "WHERE g.rolname = ANY(:groups) AND NOT m.rolname = ANY(:groups) ORDER BY m.rolname"
        ),
        {"groups": list(names.values())},
    )
    return [(member, kinds[group], grantor or "?") for member, group, grantor in rows]


def _kind_of(session: Session, names: dict[str, str], role: str) -> str | None:
    held = [kind for member, kind, _ in _memberships(session, names) if member == role]
    return max(held, key=KINDS.index) if held else None


def _check_role(session: Session, names: dict[str, str], role: str) -> None:
    if not _ROLE_NAME.match(role):
        raise UsageError(f"database role {role!r} is not a plain role name (letters, digits, '_', '.', '-')")
    if role in names.values() or role.lower() == "public":
        raise UsageError(f"{role!r} is a group role, not a user: grant roles to login roles")
    if not _existing(session, [role]):
        raise UsageError(f"no database role {role!r} on this server: create it first (CREATE ROLE {role} LOGIN)")


def _prepare(session: Session, role: str) -> dict[str, str]:
    """The group roles, set up (by the owner) or found, after checking that this role may grant."""
    if not is_postgresql(session):
        raise no_roles_on_sqlite()
    names = role_names(session)
    _check_role(session, names, role)
    if _owns_catalog(session):
        _set_up(session, names)
    elif len(_existing(session, names.values())) < len(KINDS):
        raise PermissionDenied(
            "this catalog's roles are not set up yet: the owner of its tables (or a superuser) runs the "
            "first atmoe-reg db grant"
        )
    checks = " AND ".join(f"pg_has_role(:{kind}, 'MEMBER WITH ADMIN OPTION')" for kind in KINDS)
    allowed = session.execute(
        text(f"SELECT rolsuper OR rolcreaterole OR ({checks}) FROM pg_roles WHERE rolname = current_user"), names
    ).scalar()
    if not allowed:
        user = _session_user(session)
        raise PermissionDenied(f"database role {user!r} may not grant roles: only an admin of this catalog does")
    return names


def _revoke(session: Session, names: dict[str, str], role: str, kinds: Iterable[str]) -> None:
    for kind in kinds:
        session.execute(text(f"REVOKE {_quote(session, names[kind])} FROM {_quote(session, role)}"))
    left = [(kind, grantor) for member, kind, grantor in _memberships(session, names) if member == role]
    stuck = [(kind, grantor) for kind, grantor in left if kind in kinds]
    if stuck:  # PostgreSQL 16 revokes only the grants this role made
        kind, grantor = stuck[0]
        raise PermissionDenied(f"{role}'s {kind} role was granted by {grantor}: revoke it as {grantor} or a superuser")


def refresh(registry: Registry) -> bool:
    """After ``db upgrade`` by the catalog's owner: grant the roles' privileges again, tables a new
    revision added included. True when it did (PostgreSQL, roles set up, run by the owner)."""
    with registry.write() as session:
        if not is_postgresql(session):
            return False
        names = role_names(session)
        if len(_existing(session, names.values())) < len(KINDS) or not _owns_catalog(session):
            return False
        _set_up(session, names)
        return True


@dataclass(frozen=True)
class RoleChange:
    """What ``grant`` or ``revoke`` did: the role now (None: no role) and before."""

    role: str
    kind: str | None
    previous: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "kind": self.kind, "previous": self.previous}


def grant(registry: Registry, kind: str, role: str) -> RoleChange:
    """Make the login role ``role`` exactly a ``kind`` of this catalog (its other role, if any, goes);
    logged as a ``grant`` event in the same transaction."""
    if kind not in KINDS:
        raise UsageError(f"role {kind!r}: expected one of {', '.join(KINDS)}")
    with registry.write() as session:
        names = _prepare(session, role)
        previous = _kind_of(session, names, role)
        _revoke(session, names, role, [k for k in KINDS if k != kind])
        admin_option = " WITH ADMIN OPTION" if kind == "admin" else ""  # admins grant roles in turn
        session.execute(text(f"GRANT {_quote(session, names[kind])} TO {_quote(session, role)}{admin_option}"))
        if previous != kind:
            events.record(session, "grant", role, {"role": kind, "previous": previous})
        return RoleChange(role, kind, previous)


def revoke(registry: Registry, role: str) -> RoleChange:
    """Take every role of this catalog from ``role``; logged as a ``revoke`` event."""
    with registry.write() as session:
        names = _prepare(session, role)
        previous = _kind_of(session, names, role)
        _revoke(session, names, role, KINDS)
        if previous is not None:
            events.record(session, "revoke", role, {"previous": previous})
        return RoleChange(role, None, previous)


@dataclass(frozen=True)
class RoleMember:
    role: str
    kind: str  # reader, writer, admin, or owner (of the catalog's tables: every privilege)
    group: str | None  # the group role it is a member of

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "kind": self.kind, "group": self.group}


def members(registry: Registry) -> list[RoleMember]:
    """Who holds which role in this catalog, the owner of its tables first."""
    with registry.session() as session:
        if not is_postgresql(session):
            raise no_roles_on_sqlite()
        names = role_names(session)
        owner = session.execute(
            text("SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'experts'")
        ).scalar()
        found = [RoleMember(str(owner), "owner", None)] if owner else []
        by_role: dict[str, str] = {}
        for member, kind, _ in _memberships(session, names):
            if member not in by_role or KINDS.index(kind) > KINDS.index(by_role[member]):
                by_role[member] = kind
        found.extend(RoleMember(role, kind, names[kind]) for role, kind in sorted(by_role.items()))
        return found
