"""gc never deletes a blob that a committed row references, whatever the timing (SQLite, or PostgreSQL
under ATMOE_TEST_PG=1).

The two interleavings of the reliability issue are forced deterministically, with a second
``Registry`` on the same catalog playing the other process:

- gc has read the references, then a writer commits a row that reuses old unreferenced blobs; gc
  must not delete them;
- a writer has stored its blobs, then a gc (grace 0) deletes them before the writer commits; the
  writer must write them again (or fail), never commit a dangling row.

The soak test (slow) runs gc in a loop in one process while others add, remove and import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.store import BlobStore  # noqa: E402


def _age_all_blobs(store: BlobStore, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for digest in LISTING(store):
        os.utime(store.path_for(digest), (old, old))


LISTING = BlobStore.iter_digests


def _dangling(registry: Registry) -> list[str]:
    return [str(problem) for problem in registry.verify()]


def test_gc_rereads_references_before_it_deletes(tmp_path, monkeypatch):
    adapter = write_adapter(tmp_path / "a", seed=1)
    with Registry.open() as registry:
        registry.add_expert(adapter, name="x", group="functional")
        registry.remove_expert("x")
        _age_all_blobs(registry.store)  # unreferenced and older than any grace: gc candidates

        listing = LISTING

        def listing_then_a_writer(store):
            digests = list(listing(store))
            with Registry.open() as other:  # another process re-adds the same content meanwhile
                other.add_expert(adapter, name="x", group="functional")
            _age_all_blobs(store)  # even with its touch undone, the committed row must protect them
            yield from digests

        monkeypatch.setattr(BlobStore, "iter_digests", listing_then_a_writer)
        report = registry.gc(dry_run=False, grace_seconds=0)
        monkeypatch.setattr(BlobStore, "iter_digests", listing)
        assert report.blobs == []
        assert _dangling(registry) == []
        assert registry.get_expert("x").files  # the re-added row, its blobs in place


def test_a_writer_rewrites_blobs_that_vanished_before_its_commit(tmp_path, monkeypatch):
    from atmoe.registry import experts

    adapter = write_adapter(tmp_path / "a", seed=2)
    stored_then_collected = experts._store_adapter

    def store_then_gc(registry, info):
        stored = stored_then_collected(registry, info)
        with Registry.open() as other:  # another process: gc --apply --grace 0 before this add commits
            removed = other.gc(dry_run=False, grace_seconds=0).blobs
        assert {b["digest"] for b in removed} == {blob.digest for _, blob in stored}
        return stored

    monkeypatch.setattr(experts, "_store_adapter", store_then_gc)
    with Registry.open() as registry:
        record, created = registry.add_expert(adapter, name="y", group="functional")
        assert created
        assert _dangling(registry) == []
        assert all(registry.store.has(f.sha256) for f in record.files)


def test_a_router_blob_gc_removed_before_the_commit_is_written_again(tmp_path, monkeypatch):
    """The same protocol for any writer: a transaction naming its blobs gets them back in place."""
    with Registry.open() as registry:
        blob = registry.store.put_bytes(b"router weights")
        registry.store.remove(blob.digest)  # as a gc would, between the write and the commit
        seen = []

        def work(session):
            seen.append(registry.store.has(blob.digest))
            return "committed"

        assert registry.transact(work, blobs={blob.digest: lambda: registry.store.put_bytes(b"router weights")}) == (
            "committed"
        )
        assert seen == [True]
        registry.store.remove(blob.digest)
        from atmoe.errors import ChecksumMismatch

        with pytest.raises(ChecksumMismatch, match="vanished"):  # a rewrite that cannot restore it: no commit
            registry.transact(work, blobs={blob.digest: lambda: None})
        assert seen == [True]


SOAK_WORKER = textwrap.dedent(
    """
    import json, random, sys, time
    from pathlib import Path
    from atmoe.registry import Registry
    from atmoe.errors import AtmoeError

    role, root, seconds, seed = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    adapters = sorted((root / "adapters").iterdir())
    archive = root / "catalog.tar"
    done = {"adds": 0, "removes": 0, "imports": 0, "gcs": 0, "collected": 0, "refused": 0}
    deadline = time.time() + seconds
    while time.time() < deadline:
        with Registry.open() as registry:
            if role == "gc":
                done["collected"] += len(registry.gc(dry_run=False, grace_seconds=0).blobs)
                done["gcs"] += 1
                continue
            action = rng.choice(["add", "add", "remove", "import"])
            try:
                if action == "add":
                    path = rng.choice(adapters)
                    registry.add_expert(path, name=path.name, group="functional")
                elif action == "remove":
                    names = sorted({e.name for e in registry.list_experts()})
                    if names:
                        registry.remove_expert(rng.choice(names), force=True)
                else:
                    from atmoe.registry.archive import import_archive
                    import_archive(registry, archive)
                done[action + "s"] += 1
            except AtmoeError:
                done["refused"] += 1  # e.g. remove of a name another worker removed first
    print(json.dumps(done))
    """
)


@pytest.mark.slow
def test_gc_in_a_loop_against_adders_removers_and_importers_loses_nothing(tmp_path):
    seconds = 30.0
    root = tmp_path / "soak"
    for i in range(6):
        write_adapter(root / "adapters" / f"e{i}", seed=100 + i)
    ok("add-expert", root / "adapters" / "e0", "--name", "imported", "--group", "functional")
    ok("export", "imported", "--out", root / "catalog.tar")
    ok("remove", "imported", "--force")
    script = tmp_path / "worker.py"
    script.write_text(SOAK_WORKER)
    roles = ["gc", "writer", "writer", "writer"]
    workers = [
        subprocess.Popen([sys.executable, str(script), role, str(root), str(seconds), str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        for i, role in enumerate(roles)
    ]  # fmt: skip
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=seconds + 120)
        assert worker.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    gc_result, writers = results[0], results[1:]
    assert gc_result["gcs"] > 5 and gc_result["collected"] > 0  # gc really ran and really deleted
    assert sum(w["adds"] for w in writers) > 10 and sum(w["removes"] for w in writers) > 0
    assert sum(w["imports"] for w in writers) > 0
    with Registry.open() as registry:
        assert registry.verify() == []  # no committed row points to a missing or altered blob
        for expert in registry.list_experts(with_files=True):
            assert all(registry.store.has(f.sha256) for f in expert.files or ())
