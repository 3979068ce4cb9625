"""Damage a stored blob the way a disk, a colleague or an attacker would, in a local store or a bucket.

In a bucket the object itself is rewritten and this machine's cached copy is dropped, as if the
next read came from another machine (a cached copy is verified, so it would still build).
"""

from __future__ import annotations

from collections.abc import Callable

from atmoe.registry import Registry


def rewrite_blob(digest: str, change: Callable[[bytes], bytes]) -> None:
    """Replace the stored bytes of ``digest`` by ``change(old bytes)``."""
    with Registry.open() as registry:
        store = registry.store
        if hasattr(store, "bucket"):
            key = store.key_for(digest)
            old = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
            store.client.put_object(Bucket=store.bucket, Key=key, Body=change(old))
            store.cache.remove(digest)
            return
        path = store.path_for(digest)
    path.chmod(0o644)  # blobs are read-only
    path.write_bytes(change(path.read_bytes()))


def flip_byte(digest: str, offset: int = -1) -> None:
    def flipped(data: bytes) -> bytes:
        changed = bytearray(data)
        changed[offset] ^= 0x01
        return bytes(changed)

    rewrite_blob(digest, flipped)


def drop_cached(digest: str) -> None:
    """Forget this machine's cached copy (a no-op for a local store)."""
    with Registry.open() as registry:
        cache = getattr(registry.store, "cache", None)
        if cache is not None:
            cache.remove(digest)
