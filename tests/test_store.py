"""The content-addressed blob store: round trip, dedup, read-only blobs, verified reads, temp files."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atmoe.errors import ChecksumMismatch, UsageError
from atmoe.registry.store import CHUNK_SIZE, TEMP_PREFIX, BlobStore

# a few sizes around the 1 MiB chunk boundary, plus small random blobs
blob_data = st.one_of(
    st.binary(max_size=4096),
    st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1]).map(lambda n: os.urandom(n)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=blob_data)
def test_round_trip(tmp_path: Path, data: bytes) -> None:
    store = BlobStore(tmp_path / "store")
    blob = store.put_bytes(data)
    assert blob.digest == hashlib.sha256(data).hexdigest()
    assert blob.size == len(data)
    assert store.open_verified(blob.digest) == data
    path = store.path_verified(blob.digest)
    assert path == store.root / "sha256" / blob.digest[:2] / blob.digest[2:]
    assert path.read_bytes() == data
    assert not stat.S_IMODE(path.stat().st_mode) & 0o222, "blobs are read-only"
    again = store.put_stream(io.BytesIO(data))
    assert again.digest == blob.digest and not again.created
    assert list(store.iter_temp_files()) == []


def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = store.put_bytes(b"same")
    second = store.put_bytes(b"same")
    assert first.created and not second.created
    assert list(store.iter_digests()) == [first.digest]


def test_put_file_streams_in_chunks(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * CHUNK_SIZE + 17))
    seen: list[int] = []
    store = BlobStore(tmp_path / "store")
    blob = store.put_file(source, inspect=lambda chunk: seen.append(len(chunk)))
    assert seen == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE, 17]
    assert blob.digest == hashlib.sha256(source.read_bytes()).hexdigest()


def test_inspect_failure_stores_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")

    def refuse(_chunk: memoryview) -> None:
        raise ValueError("bad bytes")

    with pytest.raises(ValueError, match="bad bytes"):
        store.put_stream(io.BytesIO(b"payload"), inspect=refuse)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_altered_blob_is_caught_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"weights").digest
    path = store.path_for(digest)
    path.chmod(0o644)
    path.write_bytes(b"weightz")
    with pytest.raises(ChecksumMismatch, match=digest):
        store.open_verified(digest)
    with pytest.raises(ChecksumMismatch, match=digest):
        store.path_verified(digest)
    assert digest in (store.check(digest) or "")


def test_missing_blob_is_caught_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(ChecksumMismatch, match="missing"):
        store.open_verified(digest)


def test_damaged_blob_of_another_size_is_healed_by_a_new_copy(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"weights").digest
    path = store.path_for(digest)
    path.chmod(0o644)
    path.write_bytes(b"w")
    assert store.put_bytes(b"weights").created
    assert store.open_verified(digest) == b"weights"


@pytest.mark.parametrize("digest", ["", "abc", "../" + "a" * 61, "A" * 64, "g" * 64])
def test_digests_are_checked(tmp_path: Path, digest: str) -> None:
    with pytest.raises(UsageError):
        BlobStore(tmp_path).path_for(digest)


def test_temp_files_are_listed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.ensure()
    stale = store.blobs_dir / f"{TEMP_PREFIX}abc"
    stale.write_bytes(b"partial")
    assert list(store.iter_temp_files()) == [stale]
