"""Catalog references to loaded models: resolution, loading on first use, and a bounded LRU.

A request's ``model`` is a reference ``NAME[@VERSION][:ROUTER]``. It resolves, in the catalog, to
one composition version and router (``letters:prod`` and ``letters@1:1`` may be the same), the
*key* ``NAME@VERSION:ROUTER`` (``NAME@VERSION`` for a composition without a router), and every key
is loaded once, with one batching worker. A fully numeric reference never changes what it names, so
its resolution is remembered; an alias or ``latest`` is resolved again at each request, so that a
moved alias serves the new router from the next request on.

Models named at start are loaded then and stay; at most ``max_models`` others are loaded on
demand, and loading one more unloads the least recently used (its worker finishes the rows it
holds first). Loads run in a thread, one per key at a time, and never download unless the user
allowed downloads (``atmoe.loading``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from atmoe.serve.config import ServeConfig
from atmoe.serve.engine import Worker

log = logging.getLogger("atmoe.serve")


@dataclass
class Served:
    """One loaded model and its worker."""

    key: str
    backend: Any  # a serve.backends backend
    worker: Worker
    lineage: dict[str, Any]
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)


def lineage_of(composition: Any, router: Any | None) -> dict[str, Any]:
    """What an answer traces back to: the composition version, its pinned experts (version and
    digest), the general expert, the router (its blob digest and training data digest), the base model."""
    return {
        "composition": composition.ref,
        "router": router.ref if router is not None else None,
        "router_kind": router.kind if router is not None else None,
        "router_digest": router.blob_digest if router is not None else None,
        "router_data_digest": router.data_digest if router is not None else None,
        "experts": [member.to_dict() for member in composition.members],
        "general": composition.general.to_dict() if composition.general is not None else None,
        "base_model": composition.base_model,
        "base_revision": composition.base_revision,
    }


def _immutable(ref: str) -> bool:
    """``NAME@N:M``: names one router for good (an alias, ``latest`` or a missing part can move)."""
    from atmoe.registry.names import parse_ref

    parsed = parse_ref(ref)
    return parsed.version is not None and isinstance(parsed.router, int)


class ModelPool:
    """The models a server holds, by key. ``get`` is for the event loop; ``preload`` for the start."""

    def __init__(self, registry: Any, config: ServeConfig, *, loader: Callable[[str], Served] | None = None) -> None:
        self.registry = registry
        self.config = config
        self._loader = loader or self._load
        self._models: OrderedDict[str, Served] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Future[Served]] = {}
        self._known: dict[str, str] = {}  # immutable reference -> key
        self._lock = threading.Lock()
        self.rows_left_at_close = 0  # rows still waiting or running when ``close`` was called

    # -- resolution and loading (threads) ------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The key of ``ref``; raises the catalog's NotFound / UsageError for a bad one."""
        known = self._known.get(ref)
        if known is not None:
            return known
        with self._lock:
            if ref in self._models:  # a key itself, or a model added as it is (``add``)
                return ref
        from atmoe.registry.names import parse_ref
        from atmoe.registry.routers import resolve_router

        parsed = parse_ref(ref)
        with self.registry.session() as session:
            composition, router = resolve_router(session, parsed, required=False)
            key = f"{composition.ref}:{router.number}" if router is not None else composition.ref
        if _immutable(ref):
            self._known[ref] = key
        return key

    def _load(self, key: str) -> Served:
        import torch

        from atmoe.serve.backends import CompositionBackend

        composition_ref, _, router_number = key.partition(":")
        built = self.registry.build(key, router=bool(router_number))
        model = built.model.to(torch.device(self.config.device))
        backend = CompositionBackend(model, built.tokenizer)
        composition = self.registry.composition(composition_ref)
        router = None
        if router_number:
            router = next(r for r in self.registry.routers(composition_ref) if r.number == int(router_number))
        worker = Worker(
            backend,
            max_batch=self.config.max_batch,
            max_wait_ms=self.config.max_wait_ms,
            max_queue=self.config.max_queue,
            name=key,
        )
        return Served(key=key, backend=backend, worker=worker, lineage=lineage_of(composition, router))

    def preload(self, refs: Sequence[str]) -> list[Served]:
        """Load the models named at start (they are never unloaded); errors propagate."""
        served = []
        for ref in refs:
            key = self.resolve(ref)
            with self._lock:
                existing = self._models.get(key)
            if existing is None:
                existing = self._loader(key)
                with self._lock:
                    self._models[key] = existing
            existing.pinned = True
            served.append(existing)
        return served

    def add(self, served: Served) -> None:
        """Serve a model made elsewhere (a plain base model, say) under its key; it stays loaded."""
        served.pinned = True
        with self._lock:
            self._models[served.key] = served

    # -- the event loop's side -----------------------------------------------------------------

    async def get(self, ref: str) -> Served:
        """The served model of ``ref``, loaded now if needed (in a thread, once per key)."""
        key = await asyncio.to_thread(self.resolve, ref)
        with self._lock:
            served = self._models.get(key)
            if served is not None:
                self._models.move_to_end(key)
                return served
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            try:
                served = await asyncio.to_thread(self._loader, key)
            except BaseException as error:
                pending.set_exception(error)
                pending.exception()  # retrieved: the waiting requests re-raise it
                raise
            finally:
                del self._loading[key]
            self._admit(served)
            pending.set_result(served)
            return served
        return await asyncio.shield(pending)

    def _admit(self, served: Served) -> None:
        evicted = []
        with self._lock:
            self._models[served.key] = served
            on_demand = [s for s in self._models.values() if not s.pinned]
            while len(on_demand) > self.config.max_models:
                oldest = on_demand.pop(0)
                del self._models[oldest.key]
                evicted.append(oldest)
        for old in evicted:
            log.info("unloading %s (least recently used; --max-models %d)", old.key, self.config.max_models)
            threading.Thread(target=old.worker.close, name=f"atmoe-unload-{old.key}", daemon=True).start()

    def served(self) -> list[Served]:
        with self._lock:
            return list(self._models.values())

    def close(self, timeout: float | None = None) -> None:
        """Stop every worker once it has finished the rows it holds (at most ``timeout`` each)."""
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        self.rows_left_at_close += sum(served.worker.load for served in models)
        for served in models:
            served.worker.close(timeout)
