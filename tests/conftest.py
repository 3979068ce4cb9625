"""Shared fixtures: a temp registry home for every test, tiny PEFT adapters, registry snapshots.

PostgreSQL: with ``ATMOE_TEST_PG=1`` every test's registry lives in PostgreSQL instead of SQLite.
One database ``atmoe_test_<random>`` is created per test session on the server of
``ATMOE_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; the database in
that URL is only used to create and drop ours), its ``public`` schema is emptied before each test,
and it is dropped at the end. Tests that only make sense on SQLite use the ``sqlite_only`` marker
fixture. Example::

    ATMOE_TEST_PG=1 .venv/bin/python -m pytest -q tests/test_cli_experts.py tests/test_migrations.py

S3: with ``ATMOE_TEST_S3=1`` every test's blob store is a fresh bucket (``s3://atmoe-test-<random>/store``)
on a real S3 API server: ``ATMOE_TEST_S3_ENDPOINT`` (``.ci/run`` starts ``moto_server`` and sets it),
else a ``moto_server`` that the ``s3_endpoint`` fixture starts on a free 127.0.0.1 port for the
session. Tests of the S3 store itself (``test_s3_store.py``, ``test_two_machines.py``) use that
fixture whatever ``ATMOE_TEST_S3`` says. Tests that read a local store's files use ``local_store_only``.
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
S3_ENABLED = os.environ.get("ATMOE_TEST_S3") == "1"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "atmoe-test",
    "AWS_SECRET_ACCESS_KEY": "atmoe-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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


# -- S3 (a real S3 API server: moto's) ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The S3 endpoint URL: ATMOE_TEST_S3_ENDPOINT, or a moto_server started here for the session."""
    import subprocess
    import sys
    import time
    import urllib.request

    given = os.environ.get("ATMOE_TEST_S3_ENDPOINT")
    if given:
        yield given
        return
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.fail(f"no S3 API server: set ATMOE_TEST_S3_ENDPOINT or pip install 'moto[server]' ({server})")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on {url}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The standard AWS settings pointed at the test server (no profile, test credentials)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a test of a dead endpoint fails fast
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the test server; returns its name."""
    import boto3

    name = f"atmoe-test-{secrets.token_hex(6)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


# -- every test: a temp home -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def atmoe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """ATMOE_HOME points at a fresh temp dir; ATMOE_DB_URL / ATMOE_STORE are cleared (or PG, above)."""
    home = tmp_path / "atmoe-home"
    monkeypatch.setenv("ATMOE_HOME", str(home))
    monkeypatch.delenv("ATMOE_DB_URL", raising=False)
    monkeypatch.delenv("ATMOE_STORE", raising=False)
    monkeypatch.delenv("ATMOE_CACHE", raising=False)
    if PG_ENABLED:
        url = request.getfixturevalue("pg_database_url")
        _reset_pg_schema(url)
        monkeypatch.setenv("ATMOE_DB_URL", url)
    if S3_ENABLED:
        monkeypatch.setenv("ATMOE_STORE", f"s3://{request.getfixturevalue('s3_bucket')}/store")
    return home


@pytest.fixture
def sqlite_only() -> None:
    """Skips the test when the registry runs on PostgreSQL (ATMOE_TEST_PG=1)."""
    if PG_ENABLED:
        pytest.skip("SQLite-specific test")


@pytest.fixture
def local_store_only() -> None:
    """Skips the test when the blob store is a bucket (ATMOE_TEST_S3=1): it reads a local store's files."""
    if S3_ENABLED:
        pytest.skip("a test of the local store's files")


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
    "catalog_identity", "expert_aliases", "events", "evaluations",
)  # fmt: skip


def _bucket_listing(location: Any) -> list[str]:
    """The objects (bar the catalog marker) and unfinished multipart uploads of an s3:// store."""
    import boto3

    client = boto3.client("s3")
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.prefix):
        names += [item["Key"][len(location.prefix) :] for item in page.get("Contents", ())]
    uploads = client.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix).get("Uploads", ())
    names += [f"upload:{upload['Key'][len(location.prefix) :]}" for upload in uploads]
    return sorted(name for name in names if name != "catalog-id")


def registry_snapshot(db_url: str | None = None, store: Path | None = None) -> dict[str, Any]:
    """Row counts of every table and the list of files in the store (blobs and temp files; for a
    bucket, its objects and unfinished uploads, and the temp files of its local cache).

    Reads the database directly (no Registry.open, which would create or check the schema).
    """
    from sqlalchemy import create_engine, inspect, text

    from atmoe.registry.config import S3Location, resolve

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
    if isinstance(settings.store, S3Location):
        assert settings.cache is not None
        temps = sorted(str(p.relative_to(settings.cache)) for p in settings.cache.rglob(".tmp-*"))
        return {"rows": counts, "store": _bucket_listing(settings.store) + temps}
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


# -- the serve tests' catalog (tests/serve_fixtures.py), made once per session -----------------------


@pytest.fixture(scope="session")
def serve_catalog(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A catalog with compositions to serve (see ``tests/serve_fixtures.py``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_fixtures

    return serve_fixtures.make_catalog(tmp_path_factory.mktemp("serve"))
