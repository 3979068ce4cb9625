"""kill -9 of ``atmoe-reg add-expert`` at several points while it copies a ~40 MB adapter.

The real command runs in its own process and is killed with SIGKILL: at startup, as soon as its temp
file appears in the store, at several delays into the copy (fixed and seeded-random), and as soon as
the weights blob is renamed into place (before the row is committed). Whatever point each kill
hits, afterwards: ``verify`` is clean, no row points to a missing blob, every blob file's name is the
sha256 of its bytes; ``gc --apply --grace 0`` then removes the temp files and unreferenced blobs; a
full add finally succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sqlalchemy import select  # noqa: E402
from synthetic_lora import ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.config import resolve  # noqa: E402
from atmoe.registry.models import Expert, ExpertFile  # noqa: E402
from atmoe.registry.store import TEMP_PREFIX  # noqa: E402
from atmoe.registry.validate import WEIGHTS_FILE  # noqa: E402

ATMOE_REG = Path(sys.executable).with_name("atmoe-reg")


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 80 layers x (q_proj, v_proj) x (A [16, 2048] + B [2048, 16]) float32 = 42 MB
    return write_adapter(tmp_path_factory.mktemp("big") / "big", seed=3, r=16, hidden=2048, layers=80)


def _start(adapter: Path) -> subprocess.Popen[bytes]:
    command = [str(ATMOE_REG), "add-expert", str(adapter), "--name", "big", "--group", "domain"]
    return subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition: Any, process: subprocess.Popen[bytes], limit: float = 60.0) -> bool:
    """Poll ``condition`` until true; False when the process ended first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the add neither progressed nor ended")


def _temp_files(blobs_dir: Path) -> list[Path]:
    return [p for p in blobs_dir.rglob(TEMP_PREFIX + "*")] if blobs_dir.exists() else []


def _blob_files(blobs_dir: Path) -> list[Path]:
    if not blobs_dir.exists():
        return []
    return [p for p in blobs_dir.glob("??/*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]


def _check_invariants() -> dict[str, int]:
    """What must hold after any crash; returns counts for the record."""
    blobs_dir = resolve().store / "sha256"
    verify = ok("verify")
    assert "OK:" in verify.stderr
    for blob in _blob_files(blobs_dir):  # every blob file is named by its content
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.parent.name + blob.name, blob
    with Registry.open() as registry, registry.session() as session:
        for file in session.scalars(select(ExpertFile)):  # no row points to a missing blob
            assert registry.store.has(file.sha256), file
        rows = len(list(session.scalars(select(Expert))))
    return {"rows": rows, "temp_files": len(_temp_files(blobs_dir)), "blobs": len(_blob_files(blobs_dir))}


def test_kill_9_during_add_expert_leaves_a_consistent_catalog(big_adapter: Path, local_store_only: None) -> None:
    assert ATMOE_REG.exists(), ATMOE_REG
    ok("init")
    blobs_dir = resolve().store / "sha256"
    weights_digest = hashlib.sha256((big_adapter / WEIGHTS_FILE).read_bytes()).hexdigest()
    weights_blob = blobs_dir / weights_digest[:2] / weights_digest[2:]
    rng = random.Random(6)

    def at_temp(delay: float) -> Any:
        """Kill ``delay`` seconds after this run's own temp file appears (earlier kills leave theirs)."""

        def reach(process: subprocess.Popen[bytes], before: set[Path]) -> bool:
            if not _wait_for(lambda: bool(set(_temp_files(blobs_dir)) - before), process):
                return False
            time.sleep(delay)
            return True

        return reach

    points: list[tuple[str, Any]] = [
        ("startup", lambda process, before: time.sleep(0.05) is None),
        ("temp file appears", at_temp(0.0)),
        ("temp + 10 ms", at_temp(0.01)),
        ("temp + 40 ms", at_temp(0.04)),
        ("weights blob in place", lambda process, before: _wait_for(weights_blob.exists, process)),
        *((f"temp + {d * 1000:.0f} ms (random)", at_temp(d)) for d in (rng.uniform(0, 0.3) for _ in range(3))),
    ]
    survived = []
    for label, reach in points:
        before = set(_temp_files(blobs_dir))
        process = _start(big_adapter)
        try:
            reached = reach(process, before)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            _, stderr = process.communicate(timeout=60)
        killed = process.returncode == -signal.SIGKILL
        assert killed or process.returncode == 0, stderr.decode()
        state = _check_invariants()
        survived.append({"point": label, "reached": bool(reached), "killed": killed, **state})
    print(json.dumps(survived, indent=1))
    kills = sum(s["killed"] for s in survived)
    assert kills >= 5, survived  # most points must have caught the add in flight
    assert any(s["temp_files"] for s in survived), survived  # some kill hit the copy itself

    leftovers = len(_temp_files(blobs_dir))
    report = json.loads(ok("gc", "--apply", "--grace", "0", "--json").stdout)
    assert _temp_files(blobs_dir) == [] and len(report["temp_files"]) == leftovers
    with Registry.open() as registry, registry.session() as session:
        referenced = set(session.scalars(select(ExpertFile.sha256)))
    assert {p.parent.name + p.name for p in _blob_files(blobs_dir)} == referenced

    final = ok("add-expert", big_adapter, "--name", "big", "--group", "domain", "--json")
    assert json.loads(final.stdout)["version"] == 1  # one version of this content, whatever the kills left
    assert "OK:" in ok("verify").stderr
    print(f"kills survived: {kills} of {len(points)} runs")
