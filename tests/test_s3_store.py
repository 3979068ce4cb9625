"""The blob store in an S3 bucket, on a real S3 API server (moto's, started by ``s3_endpoint``).

Every guarantee of the local store, checked on the bucket: content addressing, identical content
stored once (and a damaged object healed by a re-add), the row committed only after its blobs are
in place, every read that feeds a model re-hashed (the cache included), verify and gc on the
bucket with gc's reference re-read, stale multipart uploads removed, kill -9 mid-upload, a store
URL the tool does not serve refused, and a network failure that is one line and commits nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from store_tools import flip_byte  # noqa: E402
from synthetic_lora import invoke, ok, write_adapter  # noqa: E402

from atmoe.errors import ChecksumMismatch  # noqa: E402
from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.config import S3Location  # noqa: E402
from atmoe.registry.s3store import PART_SIZE, S3Store, _EtagHasher  # noqa: E402

ATMOE_REG = Path(sys.executable).with_name("atmoe-reg")


@pytest.fixture
def bucket_store(s3_bucket: str, atmoe_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's catalog keeps its blobs in a fresh bucket (whatever ATMOE_TEST_S3 says)."""
    url = f"s3://{s3_bucket}/team/experts"
    monkeypatch.setenv("ATMOE_STORE", url)
    return url


def _store(s3_bucket: str, tmp_path: Path, **options: Any) -> S3Store:
    return S3Store(S3Location(s3_bucket, "p/"), tmp_path / "cache", **options)


def _objects(store: S3Store) -> dict[str, dict[str, Any]]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix).get("Contents", [])
    return {item["Key"]: item for item in listed}


# -- the store itself --------------------------------------------------------------------------------------


def test_put_is_content_addressed_stored_once_and_read_back_verified(s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_bucket, tmp_path)
    data = os.urandom(3000)
    first = store.put_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert (first.digest, first.size, first.created) == (digest, 3000, True)
    assert store.key_for(digest) == f"p/sha256/{digest[:2]}/{digest[2:]}"
    assert list(_objects(store)) == [store.key_for(digest)]
    before = store.stat(digest)
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    again = store.put_bytes(data)
    assert again.created is False  # stored once ...
    after = store.stat(digest)
    assert before is not None and after is not None and after.mtime > before.mtime  # ... and touched for gc
    store.cache.remove(digest)
    assert store.open_verified(digest) == data  # fetched into the cache, hashed
    assert store.path_verified(digest).read_bytes() == data
    assert list(store.iter_digests()) == [digest] and store.holds_blobs()
    store.remove(digest)
    assert not store.has(digest) and not store.holds_blobs()


def test_large_blobs_go_up_in_parts_with_progress_and_the_etag_rule_matches_the_server(
    s3_bucket: str, tmp_path: Path
) -> None:
    seen: list[tuple[str, int, int]] = []

    def progress(description: str, total: int) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def bar() -> Any:
            done = [0]
            yield lambda n: done.__setitem__(0, done[0] + n)
            seen.append((description, total, done[0]))

        return bar()

    store = _store(s3_bucket, tmp_path, progress=progress)
    data = os.urandom(2 * PART_SIZE + 12345)
    blob = store.put_bytes(data)
    assert seen == [(f"upload sha256:{blob.digest[:12]}", len(data), len(data))]
    etag = store.client.head_object(Bucket=s3_bucket, Key=store.key_for(blob.digest))["ETag"].strip('"')
    assert etag.endswith("-3")  # a multipart upload of three parts
    hasher = _EtagHasher()
    hasher.update(memoryview(data))
    assert etag in hasher.etags()
    assert store.put_bytes(data).created is False  # recognised by its ETag: not uploaded again
    assert store.open_verified(blob.digest) == data


def test_an_altered_object_is_healed_by_a_re_add_and_caught_on_every_read(s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_bucket, tmp_path)
    data = b"weights " * 500
    digest = store.put_bytes(data).digest
    key = store.key_for(digest)
    store.client.put_object(Bucket=s3_bucket, Key=key, Body=data[:-1] + b"!")  # same size, other bytes
    assert "is altered in the store" in (store.check(digest) or "")  # verify reads the bucket, not the cache
    assert store.open_verified(digest) == data  # this machine's cached copy is good and verified
    store.cache.remove(digest)  # another machine, with no cached copy
    with pytest.raises(ChecksumMismatch, match="is altered in the store"):
        store.open_verified(digest)
    assert not store.cache.has(digest)  # the bad bytes were not cached
    assert store.put_bytes(data).created is True  # a re-add replaces the damaged object
    assert store.check(digest) is None


def test_a_damaged_cached_copy_is_dropped_and_fetched_again(s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_bucket, tmp_path)
    data = os.urandom(5000)
    digest = store.put_bytes(data).digest
    cached = store.cache.path_for(digest)
    cached.chmod(0o644)
    cached.write_bytes(b"\0" * 5000)
    assert store.open_verified(digest) == data
    assert store.cache.path_verified(digest).read_bytes() == data


def test_repeated_reads_stay_off_the_network(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(s3_bucket, tmp_path)
    data = os.urandom(4096)
    digest = store.put_bytes(data).digest
    store.cache.remove(digest)
    assert store.open_verified(digest) == data  # the first read fetches
    calls: list[str] = []
    original = store._call
    monkeypatch.setattr(store, "_call", lambda operation, **kw: calls.append(operation) or original(operation, **kw))
    for _ in range(3):
        assert store.open_verified(digest) == data
        assert store.path_verified(digest).read_bytes() == data
    assert calls == []


# -- through the registry ------------------------------------------------------------------------------------


def test_add_compose_verify_and_gc_on_a_bucket(bucket_store: str, tmp_path: Path) -> None:
    for seed, (name, group) in enumerate([("dx", "functional"), ("rx", "domain"), ("gi", "domain")]):
        ok("add-expert", write_adapter(tmp_path / name, seed=seed, r=4 + seed), "--name", name, "--group", group)
    ok("compose", "--name", "med", "--groups", "functional,domain", "--expert", "dx", "--expert", "gi")
    with Registry.open() as registry:
        assert isinstance(registry.store, S3Store) and registry.store.location == bucket_store
        digests = {f.sha256 for name in ("dx", "rx", "gi") for f in registry.get_expert(name).files}
        assert set(registry.store.iter_digests()) == digests
        assert registry.store.catalog_id() == registry.catalog_id  # the bucket is marked as this catalog's
    assert f"OK: {len(digests)} blobs of 3 experts" in ok("verify").stderr
    ok("remove", "rx")
    report = json.loads(ok("gc", "--json").stdout)
    assert report["blobs"] == [] and report["kept_recent"] > 0  # young: kept by the grace period
    report = json.loads(ok("gc", "--apply", "--grace", "0", "--json").stdout)
    with Registry.open() as registry:
        left = set(registry.store.iter_digests())
        referenced = {f.sha256 for name in ("dx", "gi") for f in registry.get_expert(name).files}
    assert left == referenced and {b["digest"] for b in report["blobs"]} == digests - referenced
    assert "OK:" in ok("verify").stderr


def test_verify_and_build_catch_an_object_altered_in_the_bucket(bucket_store: str, tmp_path: Path) -> None:
    ok("add-expert", write_adapter(tmp_path / "dx", seed=1), "--name", "dx", "--group", "functional")
    with Registry.open() as registry:
        weights = next(f.sha256 for f in registry.get_expert("dx").files if f.path.endswith(".safetensors"))
    flip_byte(weights)  # in the bucket; this machine's cached copy is dropped
    result = invoke("verify")
    assert result.exit_code == 1 and f"sha256:{weights} is altered in the store {bucket_store}" in result.stderr
    with Registry.open() as registry, pytest.raises(ChecksumMismatch, match="is altered in the store"):
        from atmoe.registry.build import _expert_bytes
        from atmoe.registry.experts import get_expert

        with registry.session() as session:
            _expert_bytes(registry.store, get_expert(session, "dx"))


def test_gc_rereads_references_under_the_lock_before_it_deletes(
    bucket_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a local store: a row committed after gc's listing protects its blobs, however old they look."""
    adapter = write_adapter(tmp_path / "a", seed=1)
    with Registry.open() as registry:
        registry.add_expert(adapter, name="x", group="functional")
        registry.remove_expert("x")
        store = registry.store
        assert isinstance(store, S3Store)
        real_now = store.now
        monkeypatch.setattr(store, "now", lambda: real_now() + 7200)  # every object looks two hours old
        listing = store.iter_blobs

        def listing_then_a_writer() -> Any:
            blobs = list(listing())
            with Registry.open() as other:  # another machine re-adds the same content meanwhile
                other.add_expert(adapter, name="x", group="functional")
            yield from blobs

        monkeypatch.setattr(store, "iter_blobs", listing_then_a_writer)
        report = registry.gc(dry_run=False, grace_seconds=0)
        assert report.blobs == []
        assert registry.verify() == [] and registry.get_expert("x").files


def test_gc_aborts_multipart_uploads_a_dead_writer_left(bucket_store: str) -> None:
    with Registry.open() as registry:
        store = registry.store
        assert isinstance(store, S3Store)
        key = store.key_for("ab" * 32)
        upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    # (moto reports a fixed 2010 'Initiated' time for every upload, so that a young upload is kept
    # under the grace period cannot be shown on it; AWS S3 reports the real time)
    report = json.loads(ok("gc", "--apply", "--grace", "0", "--json").stdout)
    assert report["temp_files"] == [f"s3://{store.bucket}/{key}#{upload}"]
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def _bucket_blobs(store: S3Store) -> dict[str, bytes]:
    return {
        d: store.client.get_object(Bucket=store.bucket, Key=store.key_for(d))["Body"].read()
        for d in store.iter_digests()
    }


def test_kill_9_mid_upload_leaves_a_consistent_catalog(bucket_store: str, tmp_path: Path) -> None:
    # 40 layers x (q_proj, v_proj) x (A [16, 2048] + B [2048, 16]) float32 = 21 MB: three parts
    adapter = write_adapter(tmp_path / "big", seed=3, r=16, hidden=2048, layers=40)
    ok("init")
    with Registry.open() as registry:
        store = registry.store
        assert isinstance(store, S3Store)
    command = [str(ATMOE_REG), "add-expert", str(adapter), "--name", "big", "--group", "domain"]

    def uploading() -> bool:
        return bool(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads"))

    kills = 0
    for delay in (None, 0.0, 0.05):
        process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if delay is None:
            time.sleep(0.05)  # at startup
        else:
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline and not uploading():
                time.sleep(0.002)
            time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.communicate(timeout=60)
        with Registry.open() as registry:
            assert registry.verify() == []  # no row points to a missing or partial blob
            rows = registry.list_experts()
        for digest, data in _bucket_blobs(store).items():  # every object is named by its content
            assert hashlib.sha256(data).hexdigest() == digest
        assert len(rows) <= 1
    assert kills >= 2
    ok("gc", "--apply", "--grace", "0")
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    final = json.loads(ok("add-expert", adapter, "--name", "big", "--group", "domain", "--json").stdout)
    assert final["version"] == 1
    assert "OK:" in ok("verify").stderr


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("gs://team/experts", "gs:// stores are not served"),
        ("https://example.com/x", "https:// stores are not served"),
        ("s3://Team_Bucket/x", "is not an S3 bucket name"),
        ("s3://team/../x", "may not hold '.', '..'"),
        ("s3://team/x?versionId=1", "no query"),
        ("file://host/x", "names a local directory"),
    ],
)
def test_a_store_url_the_tool_does_not_serve_is_refused_in_one_line(
    store: str, message: str, tmp_path: Path, atmoe_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "--store", store, "add-expert", write_adapter(tmp_path / "a", seed=1), "--name", "a", "--group", "domain"
    )
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no folder named 'gs:' or 's3:' appeared
    assert not atmoe_home.exists()  # nothing created


def test_a_file_url_is_a_directory(tmp_path: Path, atmoe_home: Path) -> None:
    ok(
        "--store",
        f"file://{tmp_path / 'shared'}",
        "add-expert",
        write_adapter(tmp_path / "a", seed=1),
        "--name",
        "a",
        "--group",
        "domain",
    )
    assert (tmp_path / "shared" / "sha256").is_dir()


def test_a_missing_bucket_is_one_line_and_creates_nothing(s3_env: str, tmp_path: Path, atmoe_home: Path) -> None:
    adapter = write_adapter(tmp_path / "a", seed=1)
    result = invoke("--store", "s3://no-such-bucket-here/x", "add-expert", adapter, "--name", "a", "--group", "domain")
    assert result.exit_code == 1 and "the bucket 'no-such-bucket-here' does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_network_failure_is_one_line_and_commits_nothing(
    bucket_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import _free_port, registry_snapshot

    ok("add-expert", write_adapter(tmp_path / "a", seed=1), "--name", "a", "--group", "domain")
    before = registry_snapshot()
    adapter = write_adapter(tmp_path / "b", seed=2)
    with monkeypatch.context() as dead:
        dead.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
        result = invoke("add-expert", adapter, "--name", "b", "--group", "domain")
    assert result.exit_code == 1 and "the object store failed (EndpointConnectionError" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert registry_snapshot() == before


def test_gc_refuses_a_bucket_of_another_catalog(bucket_store: str, tmp_path: Path) -> None:
    ok("add-expert", write_adapter(tmp_path / "a", seed=1), "--name", "a", "--group", "domain")
    with Registry.open() as registry:
        registry.store.mark("f" * 32)
    result = invoke("gc", "--apply")
    assert result.exit_code == 1 and "belongs to catalog ffff" in result.stderr
    with Registry.open() as registry:
        assert registry.verify() == []


def test_the_cache_follows_atmoe_cache(bucket_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATMOE_CACHE", str(tmp_path / "elsewhere"))
    ok("add-expert", write_adapter(tmp_path / "a", seed=1), "--name", "a", "--group", "domain")
    with Registry.open() as registry:
        files = {f.sha256 for f in registry.get_expert("a").files}
    assert {p.parent.name + p.name for p in (tmp_path / "elsewhere" / "sha256").glob("??/*")} == files


def test_put_stream_refuses_bytes_that_do_not_match_the_expected_digest(tmp_path: Path) -> None:
    from atmoe.registry.store import BlobStore

    store = BlobStore(tmp_path)
    with pytest.raises(ChecksumMismatch):
        store.put_stream(io.BytesIO(b"abc"), expected="0" * 64)
    assert list(store.iter_digests()) == [] and list(store.iter_temp_files()) == []
