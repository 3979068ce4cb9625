"""Migrating a catalog with data in it from the first revision (0001) to head, then using it.

Runs on the test's backend: SQLite, or PostgreSQL under ATMOE_TEST_PG=1 (a fresh database per run).
At 0001 the rows are written with the tables as that revision made them (reflected, not the current
models) and the blobs with the store itself, as atmoe-reg 0001 would have. After ``db upgrade``
every row is intact, ``verify`` is clean, re-adding known content finds it, and the catalog takes new
experts and compositions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from sqlalchemy import MetaData, select  # noqa: E402
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.registry import db  # noqa: E402
from atmoe.registry.config import resolve  # noqa: E402
from atmoe.registry.experts import content_digest  # noqa: E402
from atmoe.registry.store import BlobStore  # noqa: E402
from atmoe.registry.validate import validate_adapter  # noqa: E402

EXPERT_COLUMNS = (
    "name",
    "version",
    "domain",
    "style",
    "tags",
    "description",
    "base_model",
    "r",
    "alpha",
    "use_rslora",
    "target_modules",
    "module_ranks",
    "digest",
    "size",
    "created_by",
    "source",
)


def _add_at_0001(connection: Any, tables: dict[str, Any], store: BlobStore, adapter: Path, **row: Any) -> None:
    """What atmoe-reg add-expert did at revision 0001: blobs first, then the rows."""
    info = validate_adapter(adapter)
    files = [(name, store.put_file(adapter / name)) for name in info.files]
    group_id = connection.execute(
        select(tables["groups"].c.id).where(tables["groups"].c.name == row.pop("group"))
    ).scalar_one()
    values = {
        "group_id": group_id,
        "tags": {},
        "peft_type": info.peft_type,
        "r": info.r,
        "alpha": info.alpha,
        "use_rslora": info.use_rslora,
        "target_modules": info.target_modules,
        "module_ranks": info.module_ranks,
        "rank_pattern": info.rank_pattern,
        "alpha_pattern": info.alpha_pattern,
        "base_model": info.base_model_name_or_path,
        "digest": content_digest((name, blob.digest) for name, blob in files),
        "size": sum(blob.size for _, blob in files),
        "created_at": datetime(2024, 5, 1, tzinfo=timezone.utc),
        "created_by": "alice",
        "source": str(adapter),
        **row,
    }
    expert_id = connection.execute(tables["experts"].insert().values(**values)).inserted_primary_key[0]
    connection.execute(
        tables["expert_files"].insert(),
        [{"expert_id": expert_id, "path": name, "sha256": blob.digest, "size": blob.size} for name, blob in files],
    )


def _expert_rows(engine: Any) -> list[dict[str, Any]]:
    tables = MetaData()
    with engine.connect() as connection:
        tables.reflect(connection, only=["experts", "expert_files", "groups"])
        experts, groups, files = tables.tables["experts"], tables.tables["groups"], tables.tables["expert_files"]
        rows = [
            dict(r._mapping)
            for r in connection.execute(
                select(*(experts.c[c] for c in EXPERT_COLUMNS), groups.c.name.label("group"))
                .join(groups, experts.c.group_id == groups.c.id)
                .order_by(experts.c.name, experts.c.version)
            )
        ]
        manifest = sorted((r.path, r.sha256, r.size) for r in connection.execute(select(files)))
    return [*rows, {"files": manifest}]


def test_upgrade_from_0001_with_data_then_use_the_catalog(tmp_path: Path, snapshot: Callable[[], Any]) -> None:
    settings = resolve()
    engine = db.create_registry_engine(settings.db_url)
    try:
        assert db.upgrade(engine, "0001") == (None, "0001")
        store = BlobStore(settings.store)
        store.ensure()
        adapters = {
            name: write_adapter(tmp_path / name, seed=seed, r=r)
            for seed, (name, r) in enumerate([("g1", 2), ("g2", 4), ("dx", 4), ("triage", 2)])
        }
        tables = MetaData()
        with engine.begin() as connection:
            tables.reflect(connection)
            connection.execute(
                tables.tables["groups"]
                .insert()
                .values(name="safety", description="red flags", created_at=datetime(2024, 5, 1, tzinfo=timezone.utc))
            )

            def add(path: Path, **row: Any) -> None:
                _add_at_0001(connection, tables.tables, store, path, **row)

            add(
                adapters["g1"],
                name="gastro",
                version=1,
                group="domain",
                domain="gastroenterology",
                tags={"team": "gi"},
                description="first",
            )
            add(adapters["g2"], name="gastro", version=2, group="domain", domain="gastroenterology")
            add(adapters["dx"], name="dx", version=1, group="functional", style="rigorous")
            add(adapters["triage"], name="triage", version=1, group="safety")
        before_rows = _expert_rows(engine)
        before = snapshot()

        assert_one_line(invoke("list"), 1, "run atmoe-reg db upgrade")  # the old schema is refused, untouched
        assert snapshot() == before
        assert f"from 0001 to {db.HEAD}" in ok("db", "upgrade").stderr
        assert _expert_rows(engine) == before_rows  # every row and file as it was
        after = snapshot()
        assert after["store"] == before["store"] and after["rows"]["revision"] == db.HEAD
        assert {k: v for k, v in after["rows"].items() if k != "revision"} == {
            **{k: v for k, v in before["rows"].items() if k != "revision"},
            "compositions": 0,
            "composition_experts": 0,
            "routers": 0,
            "router_aliases": 0,
            "catalog_identity": 1,  # 0003 gives the upgraded catalog its id
        }
    finally:
        engine.dispose()

    listed = json.loads(ok("list", "--json").stdout)
    assert [(r["name"], r["version"], r["group"]) for r in listed] == [
        ("dx", 1, "functional"),
        ("gastro", 1, "domain"),
        ("gastro", 2, "domain"),
        ("triage", 1, "safety"),
    ]
    assert listed[1]["tags"] == {"team": "gi"} and listed[1]["domain"] == "gastroenterology"
    assert "OK: " in ok("verify").stderr
    # the content digests written at 0001 are the ones add-expert computes now
    again = json.loads(ok("add-expert", adapters["g1"], "--name", "gastro", "--group", "domain", "--json").stdout)
    assert (again["version"], again["created"]) == (1, False)
    new = json.loads(
        ok(
            "add-expert", write_adapter(tmp_path / "g3", seed=9, r=2), "--name", "gastro", "--group", "domain", "--json"
        ).stdout
    )
    assert new["version"] == 3
    composed = json.loads(ok("compose", "--name", "med", "--groups", "functional,domain,safety", "--json").stdout)
    assert [m["ref"] for m in composed["experts"]] == ["dx@1", "gastro@3", "triage@1"]
    assert_one_line(invoke("remove", "dx"), 1, "pinned by composition med@1")
    assert "Removed gastro@1" in ok("remove", "gastro@1").stderr
    assert "OK: " in ok("verify").stderr
