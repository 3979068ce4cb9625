"""Shared fixtures: a temp registry home for every test, tiny PEFT adapters, registry snapshots.

PostgreSQL: with ``ATMOE_TEST_PG=1`` every test's registry lives in PostgreSQL instead of SQLite.
One database ``atmoe_test_<random>`` is created per test session on the server of
``ATMOE_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; the database in
that URL is only used to create and drop ours), its ``public`` schema is emptied before each test,
and it is dropped at the end. Tests that only make sense on SQLite use the ``sqlite_only`` marker
fixture. Example::

    ATMOE_TEST_PG=1 .venv/bin/python -m pytest -q tests/test_cli_experts.py tests/test_migrations.py
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PG_ENABLED = os.environ.get("ATMOE_TEST_PG") == "1"
PG_ADMIN_URL = os.environ.get("ATMOE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# -- PostgreSQL (opt-in) ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (created here, dropped at the end)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"atmoe_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # noqa: BLE001
        admin.dispose()
        pytest.fail(f"ATMOE_TEST_PG=1 but PostgreSQL at {PG_ADMIN_URL} is unusable: {error}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_pg_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


# -- every test: a temp home -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def atmoe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """ATMOE_HOME points at a fresh temp dir; ATMOE_DB_URL / ATMOE_STORE are cleared (or PG, above)."""
    home = tmp_path / "atmoe-home"
    monkeypatch.setenv("ATMOE_HOME", str(home))
    monkeypatch.delenv("ATMOE_DB_URL", raising=False)
    monkeypatch.delenv("ATMOE_STORE", raising=False)
    if PG_ENABLED:
        url = request.getfixturevalue("pg_database_url")
        _reset_pg_schema(url)
        monkeypatch.setenv("ATMOE_DB_URL", url)
    return home


@pytest.fixture
def sqlite_only() -> None:
    """Skips the test when the registry runs on PostgreSQL (ATMOE_TEST_PG=1)."""
    if PG_ENABLED:
        pytest.skip("SQLite-specific test")


@pytest.fixture
def registry() -> Iterator[Any]:
    """A Registry opened on the temp home (what the CLI would open)."""
    from atmoe.registry import Registry

    with Registry.open() as opened:
        yield opened


# -- tiny PEFT adapters, made once per session -----------------------------------------------------

ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "diagnosis": {"r": 4, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "gastro": {"r": 2, "target_modules": ("q_proj", "down_proj"), "seed": 2},
    "rigorous": {
        "r": 4,
        "target_modules": ("q_proj", "k_proj", "v_proj"),
        "rank_pattern": {"k_proj": 2},
        "use_rslora": True,
        "seed": 3,
    },
}


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real PEFT LoRA directories of one tiny Llama (made by PEFT's save_pretrained)."""
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    base = make_tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab=64)
    root = tmp_path_factory.mktemp("adapters")
    made = {name: make_peft_adapter(base, root / name, **spec) for name, spec in ADAPTER_SPECS.items()}
    for path in made.values():
        # PEFT writes the weights 0600; make them readable like any user's files
        for file in path.iterdir():
            file.chmod(0o644)
    return made


@pytest.fixture
def adapter_copy(adapters: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """``adapter_copy("gastro")``: a private copy of an adapter directory, free to damage."""
    counter = iter(range(1_000_000))

    def copy(name: str) -> Path:
        target = tmp_path / f"copy-{next(counter)}-{name}"
        shutil.copytree(adapters[name], target)
        return target

    return copy


# -- registry state ---------------------------------------------------------------------------------

REGISTRY_TABLES = (
    "groups", "experts", "expert_files", "compositions", "composition_experts", "routers", "router_aliases",
    "catalog_identity", "expert_aliases", "events",
)  # fmt: skip


def registry_snapshot(db_url: str | None = None, store: Path | None = None) -> dict[str, Any]:
    """Row counts of every table and the list of files in the store (blobs and temp files).

    Reads the database directly (no Registry.open, which would create or check the schema).
    """
    from sqlalchemy import create_engine, inspect, text

    from atmoe.registry.config import resolve

    settings = resolve(db_url=db_url, store=store)
    engine = create_engine(settings.db_url)
    counts: dict[str, int] = {}
    try:
        with engine.connect() as connection:
            present = set(inspect(connection).get_table_names())
            for table in (*REGISTRY_TABLES, "alembic_version"):
                if table in present:
                    counts[table] = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            if "alembic_version" in present:
                counts["revision"] = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
    files = (
        sorted(
            str(p.relative_to(settings.store))
            for p in settings.store.rglob("*")
            if p.is_file() and p.name != "catalog-id"  # the store's catalog marker, not a blob
        )
        if settings.store.exists()
        else []
    )
    return {"rows": counts, "store": files}


@pytest.fixture
def snapshot() -> Callable[[], dict[str, Any]]:
    return registry_snapshot
