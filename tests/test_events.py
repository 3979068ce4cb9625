"""The audit log: every change writes one event in its own transaction, the log is append-only in the
database itself, and ``atmoe-reg log`` reads it. Runs on SQLite, and on PostgreSQL with ATMOE_TEST_PG=1."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import assert_one_line_error, invoke, ok  # noqa: E402
from tiny_catalog import save_base, save_experts  # noqa: E402

from atmoe.errors import UsageError  # noqa: E402
from atmoe.registry import Registry, events  # noqa: E402
from atmoe.registry.experts import current_user  # noqa: E402

PG_ENABLED = os.environ.get("ATMOE_TEST_PG") == "1"


def log(*args: str) -> list[dict[str, Any]]:
    return json.loads(ok("log", "--json", *args).stdout)


def actions() -> list[tuple[str, str]]:
    return [(e["action"], e["target"]) for e in log("--all")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("events")
    base = save_base(root)
    return {"base": base, **save_experts(base, root, ["diagnosis", "gastro", "gastro2", "rigorous"])}


def add(workspace: dict[str, Path], key: str, name: str, group: str) -> None:
    ok("add-expert", workspace[key], "--name", name, "--group", group)


def test_each_change_is_one_event_and_a_no_op_is_none(workspace: dict[str, Path], tmp_path: Path) -> None:
    assert log() == []
    add(workspace, "diagnosis", "diagnosis", "functional")
    add(workspace, "gastro", "gastro", "domain")
    add(workspace, "gastro", "gastro", "domain")  # identical content: no new version, nothing logged
    add(workspace, "gastro2", "gastro", "domain")
    ok("groups", "--add", "safety", "--description", "red flags")
    ok("groups", "--add", "safety")  # exists: nothing
    ok("compose", "--name", "med", "--groups", "functional,domain", "--expert", "gastro@1", "--expert", "diagnosis")
    ok("compose", "--name", "med", "--groups", "functional,domain", "--expert", "gastro@1", "--expert", "diagnosis")
    ok("train-router", "med", "--kind", "uniform", "--alias", "prod")
    ok("train-router", "med", "--kind", "uniform")
    ok("alias", "med@1:2", "prod")
    ok("alias", "med@1:2", "prod")  # already there: nothing
    ok("alias-expert", "gastro@1", "stable")
    ok("compositions", "remove", "med", "--force")
    ok("remove", "diagnosis@1")
    archive = tmp_path / "gastro.tar"
    ok("export", "gastro", "--out", archive)
    ok("gc", "--apply", "--grace", "0")
    assert actions() == [
        ("add", "diagnosis@1"),
        ("add", "gastro@1"),
        ("add", "gastro@2"),
        ("add-group", "safety"),
        ("compose", "med@1"),
        ("train", "med@1:1"),
        ("alias", "med:prod"),
        ("train", "med@1:2"),
        ("alias", "med:prod"),
        ("alias", "gastro@stable"),
        ("remove", "med@1"),
        ("remove", "diagnosis@1"),
        ("gc", str(Registry.open().store.root)),
    ]
    by_target = log("--all")
    added = by_target[0]["details"]
    assert added["group"] == "functional" and added["files"] >= 2 and len(added["digest"]) == 64
    assert by_target[4]["details"]["groups"] == {"functional": ["diagnosis@1"], "domain": ["gastro@1"]}
    assert by_target[5]["details"]["kind"] == "uniform"
    assert (by_target[6]["details"]["from"], by_target[6]["details"]["to"]) == (None, "med@1:1")
    assert (by_target[8]["details"]["from"], by_target[8]["details"]["to"]) == ("med@1:1", "med@1:2")
    assert by_target[10]["details"] == {"kind": "composition", "aliases": ["prod"]}
    gc_event = by_target[12]["details"]
    assert gc_event["blobs"] == 2 and gc_event["bytes"] > 0  # the two router blobs
    assert {e["actor"] for e in by_target} == {current_user()}
    times = [datetime.fromisoformat(e["at"]) for e in by_target]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert [e["id"] for e in by_target] == sorted(e["id"] for e in by_target)


def test_import_is_one_event_with_what_it_added(workspace: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    add(workspace, "gastro", "gastro", "domain")
    archive = tmp_path / "g.tar"
    ok("export", "gastro", "--out", archive)
    monkeypatch.setenv("ATMOE_HOME", str(tmp_path / "other"))
    if PG_ENABLED:  # another catalog: a second schema would need another database; use SQLite there
        monkeypatch.delenv("ATMOE_DB_URL")
    ok("import", archive)
    ok("import", archive)  # everything already there: nothing logged
    (event,) = log()
    assert (event["action"], event["target"]) == ("import", "g.tar")
    assert event["details"] == {"experts_added": ["gastro@1 -> gastro@1"]}


def test_a_failed_change_records_nothing(workspace: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(workspace, "gastro", "gastro", "domain")
    ok("compose", "--name", "med", "--groups", "domain")
    before = snapshot()
    assert_one_line_error(invoke("remove", "gastro@1"), 1, "pinned by composition med@1")
    assert_one_line_error(invoke("compose", "--name", "x", "--groups", "nope"), 1, "unknown group")
    assert_one_line_error(invoke("alias-expert", "gastro@1", "7"), 2, "would read as a version number")
    assert_one_line_error(invoke("add-expert", workspace["base"], "--name", "x", "--group", "domain"), 1, "")
    assert snapshot() == before
    assert [e["action"] for e in log()] == ["add", "compose"]


def test_a_change_whose_event_fails_is_rolled_back(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch, snapshot: Callable[[], Any]
) -> None:
    """The event is written in the change's transaction: when it cannot be written, the change is not
    committed either (a committed change is always logged)."""
    add(workspace, "gastro", "gastro", "domain")
    rows = snapshot()["rows"]

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("the log is unwritable")

    monkeypatch.setattr(events, "record", broken)
    assert_one_line_error(invoke("add-expert", workspace["rigorous"], "--name", "rigorous", "--group", "style"), 1,
                          "the log is unwritable")  # fmt: skip
    assert_one_line_error(invoke("compose", "--name", "med", "--groups", "domain"), 1, "unwritable")
    assert_one_line_error(invoke("alias-expert", "gastro@1", "stable"), 1, "unwritable")
    assert_one_line_error(invoke("remove", "gastro@1"), 1, "unwritable")
    assert snapshot()["rows"] == rows


@pytest.mark.parametrize("statement", ["UPDATE events SET actor = 'mallory'", "DELETE FROM events"])
def test_the_database_refuses_to_rewrite_the_log(workspace: dict[str, Path], statement: str) -> None:
    add(workspace, "gastro", "gastro", "domain")
    before = log()
    with Registry.open() as registry:
        with pytest.raises(DBAPIError, match="append-only"):
            with registry.engine.begin() as connection:
                connection.execute(text(statement))
        if PG_ENABLED:
            with pytest.raises(DBAPIError, match="append-only"):
                with registry.engine.begin() as connection:
                    connection.execute(text("TRUNCATE events"))
    assert log() == before


def test_postgresql_stamps_who_and_when_itself(workspace: dict[str, Path]) -> None:
    if not PG_ENABLED:
        pytest.skip("PostgreSQL stamps db_user and at; SQLite has no database users")
    with Registry.open() as registry, registry.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (at, actor, db_user, action, target, details) "
                "VALUES ('2001-01-01T00:00:00Z', 'me', 'mallory', 'add', 'forged@1', '{}')"
            )
        )
        user = connection.execute(text("SELECT session_user")).scalar_one()
    (event,) = log()
    assert event["db_user"] == user != "mallory"
    assert datetime.fromisoformat(event["at"]) > datetime.now(timezone.utc) - timedelta(minutes=5)


def test_sqlite_records_no_database_user(sqlite_only: None, workspace: dict[str, Path]) -> None:
    add(workspace, "gastro", "gastro", "domain")
    (event,) = log()
    assert event["db_user"] is None and event["actor"] == current_user()


# -- reading: filters and bad input ----------------------------------------------------------------------


def _backdate(registry: Registry, target: str, moment: datetime) -> None:
    """Tests only: move one event back in time (the triggers refuse it, so they are lifted briefly)."""
    with registry.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("ALTER TABLE events DISABLE TRIGGER USER"))
            connection.execute(text("UPDATE events SET at = :at WHERE target = :t"), {"at": moment, "t": target})
            connection.execute(text("ALTER TABLE events ENABLE TRIGGER USER"))
        else:
            naive = moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ")
            connection.execute(text("DROP TRIGGER events_no_update"))
            connection.execute(text("UPDATE events SET at = :at WHERE target = :t"), {"at": naive, "t": target})
            connection.execute(
                text(
                    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
                    "BEGIN SELECT RAISE(ABORT, 'the event log is append-only: UPDATE refused'); END"
                )
            )


def test_log_filters(workspace: dict[str, Path]) -> None:
    add(workspace, "diagnosis", "diagnosis", "functional")
    add(workspace, "gastro", "gastro", "domain")
    add(workspace, "gastro2", "gastro", "domain")
    ok("alias-expert", "gastro@2", "stable")
    now = datetime.now(timezone.utc)
    with Registry.open() as registry:
        _backdate(registry, "diagnosis@1", now - timedelta(days=10))
        _backdate(registry, "gastro@1", now - timedelta(hours=5))
    targets = lambda *args: [e["target"] for e in log(*args)]  # noqa: E731
    assert targets() == ["diagnosis@1", "gastro@1", "gastro@2", "gastro@stable"]
    assert targets("--since", "7d") == ["gastro@1", "gastro@2", "gastro@stable"]
    assert targets("--since", "2h") == ["gastro@2", "gastro@stable"]
    assert targets("--since", (now - timedelta(days=1)).strftime("%Y-%m-%d")) == targets("--since", "1d")[:0] + [
        "gastro@1", "gastro@2", "gastro@stable"
    ]  # fmt: skip
    assert targets("--since", (now - timedelta(hours=6)).isoformat()) == ["gastro@1", "gastro@2", "gastro@stable"]
    assert targets("--action", "alias") == ["gastro@stable"]
    assert targets("--target", "gastro") == ["gastro@1", "gastro@2", "gastro@stable"]
    assert targets("--target", "gastro@2") == ["gastro@2"]
    assert targets("--limit", "2") == ["gastro@2", "gastro@stable"]  # the newest two, oldest first
    assert targets("--actor", current_user() or "") == targets()
    assert targets("--actor", "somebody-else") == []
    table = ok("log").stdout
    assert "gastro@stable" in table and "to=gastro@2" in table and "diagnosis@1" in table
    assert "No events match" in ok("log", "--actor", "somebody-else").stderr


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--since", "yesterday"], 2, "--since 'yesterday': expected an ISO date"),
        (["--since", "5 days"], 2, "expected an ISO date"),
        (["--since", "2026-13-01"], 2, "expected an ISO date"),
        (["--limit", "0"], 2, "--limit"),
        (["--action", "dance"], 2, "--action"),
    ],
)
def test_log_bad_input_is_one_line(args: list[str], code: int, fragment: str) -> None:
    assert_one_line_error(invoke("log", *args), code, fragment)


def test_parse_since() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    assert events.parse_since("90m", now=now) == now - timedelta(minutes=90)
    assert events.parse_since("2w", now=now) == now - timedelta(weeks=2)
    assert events.parse_since("2026-12-01", now=now) == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert events.parse_since("2026-12-01T10:00+02:00", now=now) == datetime(2026, 12, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(UsageError):
        events.parse_since("-2h", now=now)


def test_unknown_actions_are_a_programming_error(registry: Registry) -> None:
    with pytest.raises(ValueError, match="unknown event action"):
        with registry.write() as session:
            events.record(session, "dance", "x")
    assert registry.events() == []


def test_migration_0005_upgrades_a_catalog_and_downgrades(workspace: dict[str, Path]) -> None:
    """Down to the revision before 0005 and up again: the experts stay, the log and the aliases go and
    come back empty, and the log is append-only again (its triggers are made by the upgrade)."""
    from atmoe.registry import db

    add(workspace, "gastro", "gastro", "domain")
    ok("alias-expert", "gastro@1", "stable")
    previous = db.KNOWN_REVISIONS[db.KNOWN_REVISIONS.index("0005") - 1]
    with Registry.open() as registry:
        assert db.downgrade(registry.engine, previous) == (db.HEAD, previous)
    assert_one_line_error(invoke("list"), 1, "run atmoe-reg db upgrade")
    assert f"to {db.HEAD}" in ok("db", "upgrade").stderr
    assert [e["name"] for e in json.loads(ok("list", "--json").stdout)] == ["gastro"]
    assert log() == [] and json.loads(ok("expert-aliases", "--json").stdout) == []
    ok("alias-expert", "gastro@1", "stable")
    with Registry.open() as registry:
        with pytest.raises(DBAPIError, match="append-only"):
            with registry.engine.begin() as connection:
                connection.execute(text("DELETE FROM events"))
    assert [e["target"] for e in log()] == ["gastro@stable"]


def test_the_team_commands_keep_the_command_line_light(workspace: dict[str, Path]) -> None:
    """Importing the command line loads no SQLAlchemy (``--help`` starts fast), and the team commands
    never load torch."""
    import subprocess

    add(workspace, "gastro", "gastro", "domain")
    code = (
        "import sys\n"
        "import atmoe.cli\n"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported by atmoe.cli'\n"
        "from atmoe.cli import main\n"
        "for args in (['log'], ['alias-expert', 'gastro@1', 'stable'], ['expert-aliases'], ['show', 'gastro@stable']):\n"
        "    assert main(args, standalone_mode=False) in (None, 0), args\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
