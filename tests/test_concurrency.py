"""Several OS processes add experts to one catalog at once (SQLite, or PostgreSQL under ATMOE_TEST_PG=1).

Each worker is a separate Python process running ``atmoe-reg add-expert`` (the click command, once per
add, each opening the registry afresh) against the test's home / database. The adds overlap on
purpose: every worker adds new content under the same name (``shared``), pairs of workers share a
name, and every worker adds identical content under ``same``. Afterwards: no add failed, no row is
lost, versions are 1..n per name with no gap or duplicate, identical content made one version, and
``verify`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sqlalchemy import select  # noqa: E402
from synthetic_lora import ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.models import Expert, ExpertFile  # noqa: E402

PROCESSES = 4
ADDS = 6  # new content per worker, plus one identical add of "same"

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from contextlib import contextmanager
    from click.testing import CliRunner
    from sqlalchemy.exc import IntegrityError
    from atmoe.cli import main
    from atmoe.registry.registry import Registry

    conflicts = 0  # write transactions that lost a race and were retried by Registry.transact
    original_write = Registry.write

    @contextmanager
    def counted_write(self):
        global conflicts
        try:
            with original_write(self) as session:
                yield session
        except IntegrityError:
            conflicts += 1
            raise

    Registry.write = counted_write
    plan = json.loads(sys.argv[1])
    go = Path(plan["go"])
    while not go.exists():  # start together
        time.sleep(0.005)
    results = []
    for name, path in plan["adds"]:
        result = CliRunner().invoke(main, ["add-expert", path, "--name", name, "--group", "functional", "--json"])
        results.append({"name": name, "code": result.exit_code, "stdout": result.stdout,
                        "stderr": result.stderr, "exception": repr(result.exception) if result.exit_code else None})
    Path(plan["out"]).write_text(json.dumps({"results": results, "conflicts": conflicts}))
    """
)


def _name(worker: int, index: int) -> str:
    return ("shared", f"pair{worker // 2}", f"own{worker}")[index % 3]


def test_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    ok("init")
    adapters = tmp_path / "adapters"
    same = write_adapter(adapters / "same", seed=10_000)
    plans = []
    for worker in range(PROCESSES):
        adds = [
            (_name(worker, i), str(write_adapter(adapters / f"w{worker}-{i}", seed=worker * 100 + i)))
            for i in range(ADDS)
        ]
        adds.insert(ADDS // 2, ("same", str(same)))
        plans.append({"go": str(tmp_path / "go"), "out": str(tmp_path / f"result-{worker}.json"), "adds": adds})
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(plan)],
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for plan in plans
    ]
    time.sleep(0.2)  # let them import; whoever is ready first waits on the go file
    (tmp_path / "go").touch()
    for process in workers:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr

    outputs = [json.loads(Path(plan["out"]).read_text()) for plan in plans]
    results = [r for out in outputs for r in out["results"]]
    conflicts = sum(out["conflicts"] for out in outputs)
    print(f"{PROCESSES} processes x {ADDS + 1} adds: {len(results)} adds, {conflicts} write conflicts retried")
    failures = [r for r in results if r["code"] != 0]
    assert failures == [], failures
    assert len(results) == PROCESSES * (ADDS + 1)

    expected = Counter(_name(w, i) for w in range(PROCESSES) for i in range(ADDS))
    expected["same"] = 1  # identical content under one name is one version, whoever added it
    with Registry.open() as registry, registry.session() as session:
        rows = list(session.execute(select(Expert.name, Expert.version)))
        versions: dict[str, list[int]] = {}
        for name, version in rows:
            versions.setdefault(name, []).append(version)
        assert {name: sorted(v) for name, v in versions.items()} == {
            name: list(range(1, count + 1)) for name, count in expected.items()
        }
        assert len(rows) == sum(expected.values())
        files = list(session.scalars(select(ExpertFile)))
        assert len(files) == 2 * len(rows)
        assert all(registry.store.has(f.sha256) for f in files)
        # every add reported the version it got, and no two adds got the same new version
        reported = Counter((json.loads(r["stdout"])["name"], json.loads(r["stdout"])["version"]) for r in results)
        assert reported[("same", 1)] == PROCESSES
        assert all(n == 1 for key, n in reported.items() if key[0] != "same")
        assert registry.verify() == []
        assert registry.gc(dry_run=True, grace_seconds=0).blobs == []  # nothing stored without a row
    assert "OK:" in ok("verify").stderr
