"""Schema migrations (alembic check, upgrade with data, refusals) and the database engine."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, inspect, select, text

from atmoe.cli import main
from atmoe.errors import SchemaMismatch
from atmoe.registry import db, netfs, search
from atmoe.registry.config import resolve
from atmoe.registry.models import Base, Expert


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, code: int, match: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and match in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.fixture
def engine() -> Any:
    """An engine on the test's database (SQLite in the temp home, or PostgreSQL), schema untouched."""
    engine = db.create_registry_engine(resolve().db_url)
    yield engine
    engine.dispose()


def test_known_revisions_are_alembic_history() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config())
    history = tuple(revision.revision for revision in reversed(list(script.walk_revisions())))
    assert history == db.KNOWN_REVISIONS
    assert script.get_current_head() == db.HEAD


def test_upgrade_head_on_blank_database_matches_models(engine: Any) -> None:
    """alembic check: the migrations build exactly the tables, indexes and constraints of models.py."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert db.upgrade(engine) == (None, db.HEAD)
    with engine.connect() as connection:
        opts = {"compare_type": True, "render_as_batch": True, "include_name": search.alembic_include_name}
        context = MigrationContext.configure(connection, opts=opts)
        assert compare_metadata(context, Base.metadata) == []
        tables = set(inspect(connection).get_table_names())
        assert {t for t in tables if not search.is_search_object(t)} == db.REGISTRY_TABLES | {"alembic_version"}
        assert (search.SEARCH_TABLE in tables) == (connection.dialect.name == "sqlite")
        groups = connection.execute(text("SELECT name FROM groups ORDER BY id")).scalars().all()
    assert groups == ["functional", "domain", "style", "general"]


def test_downgrade_to_base_and_up_again(engine: Any) -> None:
    db.upgrade(engine)
    assert db.downgrade(engine, "base") == (db.HEAD, None)
    with engine.connect() as connection:
        assert not db.REGISTRY_TABLES & set(inspect(connection).get_table_names())
    assert db.upgrade(engine) == (None, db.HEAD)


def _insert_expert_at_0001(engine: Any) -> None:
    with engine.begin() as connection:
        group_id = connection.execute(text("SELECT id FROM groups WHERE name = 'domain'")).scalar_one()
        connection.execute(
            text(
                "INSERT INTO experts (name, version, group_id, tags, peft_type, r, alpha, use_rslora, "
                "target_modules, module_ranks, rank_pattern, alpha_pattern, digest, size, created_at) "
                "VALUES ('gastro', 1, :group_id, '{\"team\": \"gi\"}', 'LORA', 4, 8.0, :false, '[\"q_proj\"]', "
                "'{}', '{}', '{}', :digest, 3, CURRENT_TIMESTAMP)"
            ),
            {"group_id": group_id, "digest": "a" * 64, "false": False},
        )
        expert_id = connection.execute(text("SELECT id FROM experts")).scalar_one()
        connection.execute(
            text("INSERT INTO expert_files (expert_id, path, sha256, size) VALUES (:id, 'w', :sha, 3)"),
            {"id": expert_id, "sha": "b" * 64},
        )


def test_older_schema_is_refused_then_upgraded_with_its_data(engine: Any, snapshot: Callable[[], Any]) -> None:
    db.upgrade(engine, "0001")
    _insert_expert_at_0001(engine)
    before = snapshot()

    result = invoke("db", "current")
    assert result.exit_code == 0 and result.stdout.startswith("0001") and "db upgrade" in result.stdout
    assert_one_line_error(invoke("list"), 1, "run atmoe-reg db upgrade")
    assert snapshot() == before

    result = invoke("db", "upgrade")
    assert result.exit_code == 0, result.output
    assert f"from 0001 to {db.HEAD}" in result.stderr
    assert invoke("db", "current").stdout.strip() == f"{db.HEAD} (head)"
    listed = invoke("list", "--json")
    assert listed.exit_code == 0
    import json

    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["version"], row["group"], row["tags"]) == ("gastro", 1, "domain", {"team": "gi"})
    from atmoe.registry import Registry

    with Registry.open() as registry, registry.session() as session:
        expert = session.scalars(select(Expert)).one()
        assert [f.sha256 for f in expert.files] == ["b" * 64]
    assert f"already at schema {db.HEAD}" in invoke("db", "upgrade").stderr


def test_unknown_revision_is_refused_with_a_hint(engine: Any, snapshot: Callable[[], Any]) -> None:
    db.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    before = snapshot()
    for args in (["list"], ["init"], ["db", "upgrade"], ["groups"]):
        assert_one_line_error(invoke(*args), 1, "'9999' is unknown to this atmoe-reg")
    assert "newer version" in invoke("list").stderr
    assert snapshot() == before
    assert "unknown" in invoke("db", "current").stdout
    with pytest.raises(SchemaMismatch, match="upgrade atmoe-registry"):
        db.ensure_schema(engine)


def test_tables_without_a_revision_are_refused(engine: Any) -> None:
    Base.metadata.create_all(engine)
    assert_one_line_error(invoke("list"), 1, "no schema revision")


def test_new_database_is_created_at_head_by_any_command(snapshot: Callable[[], Any]) -> None:
    assert invoke("db", "current").stdout.startswith("none")
    assert invoke("list").exit_code == 0
    assert snapshot()["rows"]["revision"] == db.HEAD
    assert invoke("db", "current").stdout.strip() == f"{db.HEAD} (head)"


# -- SQLite engine -------------------------------------------------------------------------------------


def test_sqlite_pragmas(sqlite_only: None, atmoe_home: Path) -> None:
    from atmoe.registry import Registry

    with Registry.open() as registry, registry.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.BUSY_TIMEOUT_MS


def test_sqlite_writes_take_the_lock_at_begin(sqlite_only: None, atmoe_home: Path) -> None:
    from atmoe.registry import Registry

    with Registry.open() as registry:
        other = sqlite3.connect(atmoe_home / "registry.db", timeout=0, isolation_level=None)
        try:
            with registry.session() as session:  # a read does not block writers
                session.execute(select(1))
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            with registry.write() as session:  # a write session holds the write lock from BEGIN
                session.execute(select(1))
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()


def test_sqlite_migrations_run_with_foreign_keys_off(
    sqlite_only: None, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch migrations DROP and recreate tables; with foreign keys on, that would cascade-delete."""
    from alembic import command

    real_upgrade = command.upgrade
    seen: list[int] = []

    def spy(config: Any, target: str) -> None:
        seen.append(config.attributes["connection"].exec_driver_sql("PRAGMA foreign_keys").scalar())
        real_upgrade(config, target)

    monkeypatch.setattr(command, "upgrade", spy)
    db.upgrade(engine)
    assert seen == [0]
    with engine.connect() as connection:  # the pooled connection has them back on
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_foreign_keys_are_enforced(sqlite_only: None) -> None:
    from sqlalchemy.exc import IntegrityError

    from atmoe.registry import Registry

    with Registry.open() as registry:
        with pytest.raises(IntegrityError):
            with registry.write() as session:
                session.execute(
                    text("INSERT INTO expert_files (expert_id, path, sha256, size) VALUES (42, 'x', 'y', 1)")
                )


# -- network filesystems ---------------------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/team rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2
41 40 0:51 / /mnt/team/local rw,relatime - ext4 /dev/vdb rw
42 27 0:52 / /mnt/with\\040space rw - fuse.sshfs host:/x rw
43 27 0:53 / /var/lib/overlay rw - fuse.fuse-overlayfs fuse-overlayfs rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/mnt/team/registry.db", "nfs4"),
        ("/mnt/team/local/registry.db", "ext4"),
        ("/mnt/teamwork/registry.db", "ext4"),
        ("/mnt/with space/registry.db", "fuse.sshfs"),
        ("/home/me/.atmoe/registry.db", "ext4"),
    ],
)
def test_mountinfo_longest_mount_point_wins(path: str, expected: str) -> None:
    assert netfs.mountinfo_fstype(path, MOUNTINFO) == expected


@pytest.mark.parametrize(
    ("magic", "fstype", "expected"),
    [
        (0xEF53, "ext4", None),
        (0x6969, None, "nfs"),
        (0x6969, "nfs", "nfs"),
        (0xFF534D42, None, "cifs"),
        (0xFE534D42, None, "smb2"),
        (0x517B, None, "smb"),
        (0x01021997, None, "9p"),
        (0x65735546, None, "fuse"),  # FUSE of unknown kind: possibly remote
        (0x65735546, "fuse.sshfs", "fuse.sshfs"),
        (0x65735546, "fuse.fuse-overlayfs", None),  # a local FUSE filesystem
        (None, "cifs", "cifs"),
        (None, None, None),
    ],
)
def test_network_filesystem_detection(
    tmp_path: Path, magic: int | None, fstype: str | None, expected: str | None
) -> None:
    found = netfs.network_filesystem(tmp_path / "registry.db", magic=lambda _p: magic, fstype=lambda _p: fstype)
    assert found == expected


def test_statfs_reads_this_machine(tmp_path: Path) -> None:
    magic = netfs.statfs_magic(tmp_path)
    assert magic is None or isinstance(magic, int)
    assert netfs.network_filesystem(tmp_path) is None  # the temp dir is local


def test_network_filesystem_warning_points_to_postgresql(
    sqlite_only: None, monkeypatch: pytest.MonkeyPatch, snapshot: Callable[[], Any]
) -> None:
    monkeypatch.setattr(netfs, "_warned", set())
    monkeypatch.setattr(netfs, "network_filesystem", lambda _path: "nfs4")
    first = invoke("list")
    assert first.exit_code == 0
    warnings = [line for line in first.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "network filesystem (nfs4)" in warnings[0] and "PostgreSQL" in warnings[0]
    assert first.stdout == ""
    second = invoke("list")  # once per process
    assert "Warning:" not in second.stderr
    with create_engine(resolve().db_url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal"
