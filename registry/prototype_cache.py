"""The cache of Arrow prototypes, keyed by what determines them: the algorithm, the base model, the expert's
content digest and (GenKnowSub) the general expert's.

Computing a prototype is cheap next to building the model, but a team re-creates arrow routers for
many compositions of the same experts; each expert's prototypes are computed once per key. The cache
lives beside the store's blobs on this machine: ``STORE/derived/`` for a local store, the local cache
``ATMOE_CACHE/derived/`` for a bucket (derived data is never uploaded, and gc, which collects only
``sha256/``, leaves it). An entry is read back only if its recorded key and shape match, every row is
a unit vector or zero, and nothing is NaN; otherwise it is computed again and replaced. A router made
from it stores its prototypes in its own (content-addressed, verified) blob, so routing never reads
the cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from atmoe.registry.registry import Registry


def cache_key(
    *, algorithm: str, base_model: str | None, base_revision: str | None, expert: str, general: str | None
) -> str:
    text = "\n".join([algorithm, base_model or "", base_revision or "", expert, general or ""])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _root(registry: Registry) -> Path:
    store = registry.store
    base = store.cache.root if hasattr(store, "cache") else store.root
    return Path(base) / "derived" / "arrow"


def load(registry: Registry, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached prototypes [blocks, D] under ``key``, or None (absent, or not what was stored)."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = _root(registry) / f"{key}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as entry:
            metadata = entry.metadata() or {}
            value = entry.get_tensor("prototypes") if "prototypes" in entry.keys() else None
    except (FileNotFoundError, SafetensorError, ValueError, OSError):
        return None
    if metadata.get("key") != key or value is None or tuple(value.shape) != shape or not torch.isfinite(value).all():
        return None
    norms = value.double().norm(dim=1)
    if not bool(((norms - 1).abs() < 1e-4).logical_or(norms == 0).all()):
        return None
    return value.float()


def save(registry: Registry, key: str, prototypes: torch.Tensor) -> None:
    """Store ``prototypes`` under ``key`` atomically (a failure to cache is not an error)."""
    from safetensors.torch import save as save_safetensors

    root = _root(registry)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=root)
        try:
            os.write(fd, save_safetensors({"prototypes": prototypes.contiguous()}, metadata={"key": key}))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, root / f"{key}.safetensors")
    except OSError:
        return
