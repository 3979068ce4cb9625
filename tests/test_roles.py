"""Roles: reader / writer / admin on PostgreSQL, enforced by the database (tested with real login roles
made per test, connected as them), and plainly absent on SQLite.

The PostgreSQL tests run with ATMOE_TEST_PG=1 (CI: .ci/run); each makes its own login roles with
unique names and drops them, and this catalog's group roles, afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import assert_one_line, invoke, ok  # noqa: E402
from tiny_catalog import save_base, save_experts  # noqa: E402

from atmoe.registry import Registry, db, roles  # noqa: E402
from atmoe.registry.config import resolve  # noqa: E402
from atmoe.registry.store import BlobStore  # noqa: E402

PG_ENABLED = os.environ.get("ATMOE_TEST_PG") == "1"
postgresql_only = pytest.mark.skipif(not PG_ENABLED, reason="real PostgreSQL roles: run with ATMOE_TEST_PG=1")


# -- the privilege table (no database needed) ------------------------------------------------------------


def test_every_table_has_its_privileges_classified() -> None:
    assert set(roles.TABLE_PRIVILEGES) == db.REGISTRY_TABLES | {"alembic_version"}
    for table, by_kind in roles.TABLE_PRIVILEGES.items():
        assert set(by_kind) <= set(roles.KINDS) and by_kind["reader"] == ("SELECT",), table  # readers read all


def test_who_may_do_what() -> None:
    """The issue's split: a reader reads; a writer also adds, composes and trains; only an admin
    removes, runs gc, moves aliases (and grants)."""
    assert {operation: roles.kind_for(operation) for operation in roles.NEEDS} == {
        "add experts": "writer",
        "add groups": "writer",
        "compose": "writer",
        "train routers": "writer",
        "evaluate routers": "writer",
        "import archives": "writer",
        "set a new router alias": "writer",
        "set a new expert alias": "writer",
        "move a router alias": "admin",
        "move an expert alias": "admin",
        "remove experts": "admin",
        "remove compositions": "admin",
        "run gc --apply": "admin",
    }
    assert roles.held_by("admin")["events"] == {"SELECT", "INSERT"}  # the log is append-only for every role


def test_group_role_names_are_plain_and_distinct() -> None:
    assert roles.group_role_names("team") == {k: f"atmoe_team_{k}" for k in roles.KINDS}
    assert roles.group_role_names("team", "gi")["admin"] == "atmoe_team_gi_admin"
    odd, other = roles.group_role_names("Team-DB"), roles.group_role_names("team_db")
    assert odd["reader"] != other["reader"] and odd["reader"].startswith("atmoe_team_db_")
    long = roles.group_role_names("x" * 63)
    assert all(len(name) <= 63 for name in long.values())
    assert long != roles.group_role_names("x" * 62)


# -- SQLite: no roles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["db", "grant", "reader", "bob"], ["db", "revoke", "bob"], ["db", "roles"]])
def test_sqlite_says_it_has_no_roles(sqlite_only: None, snapshot: Callable[[], Any], args: list[str]) -> None:
    ok("init")
    before = snapshot()
    assert_one_line(invoke(*args), 2, "SQLite has no roles")
    assert snapshot() == before


# -- PostgreSQL: real roles ----------------------------------------------------------------------------


@pytest.fixture
def login_roles() -> Iterator[Callable[[str], str]]:
    """``make("reader")``: a new LOGIN role with a unique name; returns its database URL. Every role
    made, and this catalog's group roles, are dropped afterwards."""
    url = resolve().db_url
    owner = create_engine(url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make(label: str) -> str:
        name = f"atmoe_t{secrets.token_hex(3)}_{label}"
        with owner.connect() as connection:
            connection.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        made.append(name)
        return make_url(url).set(username=name).render_as_string(hide_password=False)

    try:
        yield make
    finally:
        with owner.connect() as connection, Session(bind=connection) as session:
            groups = list(roles.role_names(session).values())
            doomed = [*made, *groups]
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(:names)"),
                {"names": doomed},
            )
            for name in doomed:
                if connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).scalar():
                    connection.execute(text(f'DROP OWNED BY "{name}"'))
                    connection.execute(text(f'DROP ROLE "{name}"'))
        owner.dispose()


def as_role(url: str, *args: str | os.PathLike[str]) -> Any:
    return invoke("--db", url, *args)


def role_of(url: str) -> str:
    return str(make_url(url).username)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roles")
    base = save_base(root)
    return {"base": base, **save_experts(base, root, ["gastro", "gastro2", "diagnosis", "rigorous"])}


@pytest.fixture
def team(workspace: dict[str, Path], login_roles: Callable[[str], str]) -> dict[str, str]:
    """A catalog made by its owner (gastro@1, diagnosis@1, med@1), with a reader, a writer and an admin."""
    if not PG_ENABLED:
        pytest.skip("real PostgreSQL roles: run with ATMOE_TEST_PG=1")
    ok("add-expert", workspace["gastro"], "--name", "gastro", "--group", "domain")
    ok("add-expert", workspace["diagnosis"], "--name", "diagnosis", "--group", "functional")
    ok("compose", "--name", "med", "--groups", "functional,domain")
    urls = {kind: login_roles(kind) for kind in roles.KINDS}
    for kind, url in urls.items():
        assert f"{role_of(url)} is now a {kind}" in ok("db", "grant", kind, role_of(url)).stderr
    return urls


def raw(url: str, statement: str) -> None:
    """Run one statement as that role, bypassing the tool."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def store_files() -> list[str]:
    store = resolve().store
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


@postgresql_only
def test_grant_sets_up_the_group_roles_and_logs_it(team: dict[str, str]) -> None:
    members = json.loads(ok("db", "roles", "--json").stdout)
    with Registry.open() as registry, registry.session() as session:
        owner = session.execute(text("SELECT session_user")).scalar_one()
        names = roles.role_names(session)
    assert members[0] == {"role": owner, "kind": "owner", "group": None}
    assert {(m["role"], m["kind"], m["group"]) for m in members[1:]} == {
        (role_of(url), kind, names[kind]) for kind, url in team.items()
    }
    grants = json.loads(ok("log", "--json", "--action", "grant").stdout)
    assert [(g["target"], g["details"]["role"], g["db_user"]) for g in grants] == [
        (role_of(url), kind, owner) for kind, url in team.items()
    ]
    assert "is already a reader" in ok("db", "grant", "reader", role_of(team["reader"])).stderr
    assert len(json.loads(ok("log", "--json", "--action", "grant").stdout)) == 3  # no change, no event


@postgresql_only
def test_a_reader_reads_builds_and_routes_but_writes_nothing(
    team: dict[str, str], workspace: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    reader = team["reader"]
    assert [r["name"] for r in json.loads(as_role(reader, "list", "--json").stdout)] == ["diagnosis", "gastro"]
    for args in (["show", "gastro"], ["verify"], ["compositions"], ["groups"], ["log"], ["expert-aliases"],
                 ["gc"], ["db", "current"], ["db", "roles"]):  # fmt: skip
        assert as_role(reader, *args).exit_code == 0, (args, as_role(reader, *args).output)
    routed = as_role(reader, "route", "med", "w4 w5", "--json")
    assert routed.exit_code == 0, routed.output
    assert json.loads(routed.stdout)["lineage"]["composition"] == "med@1"

    before, blobs = snapshot(), store_files()
    name = role_of(reader)
    line = assert_one_line(
        as_role(reader, "add-expert", workspace["rigorous"], "--name", "rigorous", "--group", "style"), 1
    )
    assert f"database role {name!r} may not add experts" in line and f"atmoe-reg db grant writer {name}" in line
    refusals = {
        ("compose", "--name", "x", "--groups", "domain"): "may not compose",
        ("groups", "--add", "safety"): "may not add groups",
        ("alias-expert", "gastro@1", "stable"): "may not set a new expert alias",
        ("remove", "gastro@1"): "may not remove experts",
        ("compositions", "remove", "med@1"): "may not remove compositions",
        ("gc", "--apply", "--grace", "0"): "may not run gc --apply",
        ("train-router", "med", "--kind", "uniform"): "may not train routers",
        ("db", "grant", "reader", role_of(team["writer"])): "may not grant roles",
    }
    for args, fragment in refusals.items():
        assert_one_line(as_role(reader, *args), 1, fragment)
    assert snapshot() == before and store_files() == blobs  # not a row, not a blob

    # the database refuses the same writes when the tool is bypassed
    for statement in (
        "INSERT INTO groups (name, created_at) VALUES ('raw', now())",
        "INSERT INTO events (at, action, target, details) VALUES (now(), 'add', 'x@1', '{}')",
        "DELETE FROM expert_files",
        "UPDATE experts SET description = 'mine'",
    ):
        with pytest.raises(DBAPIError, match="permission denied"):
            raw(reader, statement)
    assert snapshot() == before


@postgresql_only
def test_a_writer_adds_composes_and_trains_but_cannot_remove_move_or_gc(
    team: dict[str, str], workspace: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    writer, name = team["writer"], role_of(team["writer"])
    assert as_role(writer, "add-expert", workspace["gastro2"], "--name", "gastro", "--group", "domain").exit_code == 0
    assert as_role(writer, "groups", "--add", "safety").exit_code == 0
    assert as_role(writer, "compose", "--name", "med2", "--groups", "functional,domain").exit_code == 0
    trained = as_role(writer, "train-router", "med2", "--kind", "uniform", "--alias", "candidate")
    assert trained.exit_code == 0, trained.output
    assert as_role(writer, "alias-expert", "gastro@2", "stable").exit_code == 0  # a new alias
    events = json.loads(ok("log", "--json", "--actor", name).stdout)
    assert [(e["action"], e["target"]) for e in events] == [
        ("add", "gastro@2"), ("add-group", "safety"), ("compose", "med2@1"), ("train", "med2@1:1"),
        ("alias", "med2:candidate"), ("alias", "gastro@stable"),
    ]  # fmt: skip
    assert {e["db_user"] for e in events} == {name}

    BlobStore(resolve().store).put_bytes(b"an unreferenced blob")
    before, blobs = snapshot(), store_files()
    refusals = {
        ("remove", "gastro@1"): "may not remove experts",
        ("compositions", "remove", "med@1"): "may not remove compositions",
        ("gc", "--apply", "--grace", "0"): "that takes the admin role",
        ("alias-expert", "gastro@1", "stable"): "may not move an expert alias",
        ("alias", "med2@1:1", "candidate"): None,  # already there: nothing to move
        ("db", "grant", "reader", role_of(team["reader"])): "may not grant roles",
        ("db", "revoke", role_of(team["reader"])): "may not grant roles",
    }
    for args, fragment in refusals.items():
        if fragment is None:
            assert as_role(writer, *args).exit_code == 0
        else:
            assert_one_line(as_role(writer, *args), 1, fragment)
    # moving an alias by training is refused before a model is built
    moved = as_role(writer, "train-router", "med2", "--kind", "uniform", "--alias", "candidate")
    assert_one_line(moved, 1, "may not move a router alias in this catalog: that takes the admin role")
    assert snapshot() == before and store_files() == blobs

    for statement in (
        "DELETE FROM composition_experts",
        "UPDATE router_aliases SET alias = 'x'",
        "UPDATE expert_aliases SET alias = 'x'",
        "SELECT id FROM catalog_identity FOR UPDATE",  # gc --apply's lock: the database refuses a writer's gc
        "UPDATE events SET actor = 'x'",
        "DELETE FROM events",
    ):
        with pytest.raises(DBAPIError, match="permission denied"):
            raw(writer, statement)
    assert snapshot() == before


@postgresql_only
def test_an_admin_removes_moves_gcs_and_grants(
    team: dict[str, str], workspace: dict[str, Path], login_roles: Callable[[str], str]
) -> None:
    admin, name = team["admin"], role_of(team["admin"])
    ok("add-expert", workspace["gastro2"], "--name", "gastro", "--group", "domain")
    assert as_role(admin, "alias-expert", "gastro@1", "stable").exit_code == 0
    assert as_role(admin, "alias-expert", "gastro@2", "stable").exit_code == 0  # moved
    assert as_role(admin, "compositions", "remove", "med@1").exit_code == 0
    removed = as_role(admin, "remove", "gastro@1")
    assert removed.exit_code == 0, removed.output
    gc = as_role(admin, "gc", "--apply", "--grace", "0", "--json")
    assert gc.exit_code == 0, gc.output
    assert len(json.loads(gc.stdout)["blobs"]) >= 1  # gastro@1's weights (its other files are shared)
    (event,) = json.loads(ok("log", "--json", "--action", "gc").stdout)
    assert event["db_user"] == name and event["details"]["blobs"] >= 1

    # an admin grants, and a new admin may grant in turn; a revoked role reads nothing
    newcomer, deputy = login_roles("newcomer"), login_roles("deputy")
    assert as_role(admin, "db", "grant", "admin", role_of(deputy)).exit_code == 0
    assert "is now a writer" in as_role(deputy, "db", "grant", "writer", role_of(newcomer)).stderr
    assert (
        as_role(newcomer, "add-expert", workspace["rigorous"], "--name", "rigorous", "--group", "style").exit_code == 0
    )
    demoted = as_role(deputy, "db", "grant", "reader", role_of(newcomer))
    assert "is now a reader of this catalog (was writer)" in demoted.stderr
    assert_one_line(as_role(newcomer, "remove", "rigorous"), 1, "may not remove experts")
    assert "no longer a reader" in as_role(admin, "db", "revoke", role_of(newcomer)).stderr
    assert_one_line(as_role(newcomer, "list"), 1, "has no role in this catalog")
    assert "has no role" in as_role(admin, "db", "revoke", role_of(newcomer)).stderr
    changes = json.loads(ok("log", "--json", "--target", role_of(newcomer)).stdout)
    assert [(c["action"], c["details"].get("role"), c["details"]["previous"], c["db_user"]) for c in changes] == [
        ("grant", "writer", None, role_of(deputy)),
        ("grant", "reader", "writer", role_of(deputy)),
        ("revoke", None, "reader", name),
    ]


@postgresql_only
def test_grant_refuses_bad_roles_in_one_line(team: dict[str, str], snapshot: Callable[[], Any]) -> None:
    before = snapshot()
    with Registry.open() as registry, registry.session() as session:
        group = roles.role_names(session)["writer"]
    assert_one_line(invoke("db", "grant", "superuser", "bob"), 2, "expected one of reader, writer, admin")
    assert_one_line(invoke("db", "grant", "reader", f"nobody_{secrets.token_hex(4)}"), 2, "no database role")
    assert_one_line(invoke("db", "grant", "reader", group), 2, "is a group role")
    assert_one_line(invoke("db", "grant", "reader", "public"), 2, "is a group role")
    assert_one_line(invoke("db", "grant", "reader", 'x"; DROP TABLE experts; --'), 2, "not a plain role name")
    assert snapshot() == before


@postgresql_only
@pytest.mark.parametrize("command", [["db", "upgrade"], ["db", "grant", "writer", "{writer}"]])
def test_the_owner_applies_the_privileges_again(team: dict[str, str], command: list[str]) -> None:
    """The owner's upgrade (a new revision may add tables) or next grant grants exactly the table's
    privileges again, so the roles never drift from ``TABLE_PRIVILEGES``."""
    raw(resolve().db_url, f'REVOKE SELECT ON experts FROM "{roles.group_role_names(_database())["reader"]}"')
    assert_one_line(as_role(team["reader"], "list"), 1, "permission denied for table experts")
    ok(*(part.format(writer=role_of(team["writer"])) for part in command))
    assert as_role(team["reader"], "list").exit_code == 0
    # anyone may see that the schema is at head; only the owner's upgrade touches the privileges
    assert "already at schema" in as_role(team["writer"], "db", "upgrade").stderr


def _database() -> str:
    return str(make_url(resolve().db_url).database)
