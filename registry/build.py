"""Building a composition on the fly: every blob re-verified, then the base model, experts and router.

All blobs a build needs (expert files and the router) are read and re-hashed first, so an altered
blob fails the build before a single weight is parsed or the base model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from atmoe.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from atmoe.errors import InvalidAdapter
from atmoe.registry.compositions import composition_config, members_by_group
from atmoe.registry.models import Composition, Expert, Router
from atmoe.registry.routers import resolve_router

if TYPE_CHECKING:
    from atmoe.registry.registry import Store


@dataclass
class Built:
    """What ``Registry.build`` returns: the model, its tokenizer and the exact references behind them."""

    model: object
    tokenizer: object
    composition: str
    router: str | None
    experts: dict[str, str] = field(default_factory=dict)  # name -> name@version
    general: str | None = None
    base_model: str | None = None

    def lineage(self) -> dict:
        return {
            "composition": self.composition,
            "router": self.router,
            "experts": dict(self.experts),
            "general": self.general,
            "base_model": self.base_model,
        }


def _expert_bytes(store: Store, expert: Expert) -> dict[str, bytes]:
    return {f.path: store.open_verified(f.sha256) for f in expert.files}


def _adapter(expert: Expert, files: dict[str, bytes]):
    from atmoe.adapters import adapter_from_bytes

    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise InvalidAdapter(f"expert {expert.ref} lacks {CONFIG_FILE} or {WEIGHTS_FILE} in the store")
    return adapter_from_bytes(files[CONFIG_FILE], files[WEIGHTS_FILE], name=expert.name)


def build_composition(
    session: Session,
    store: Store,
    ref: str,
    *,
    router: bool = True,
    base_model: str | None = None,
    dtype=None,
) -> Built:
    """Build the AT-MoE model of ``ref`` (``NAME[@VERSION][:ROUTER]``).

    The router is the one named, else the composition's newest (``router=False`` or no router yet:
    the routers keep their initial, uniform weights). ``base_model`` overrides the catalog's
    reference (a moved folder, say).
    """
    composition, chosen = resolve_router(session, ref, required=False)
    if not router:
        chosen = None
    groups = members_by_group(composition)
    # 1. read and verify every blob before parsing any of them
    files = {m.expert.name: _expert_bytes(store, m.expert) for members in groups.values() for m in members}
    general_files = _expert_bytes(store, composition.general_expert) if composition.general_expert else None
    router_bytes = store.open_verified(chosen.blob_digest) if chosen is not None else None
    # 2. only now load weights
    from atmoe import build_atmoe
    from atmoe.loading import load_base_model

    model_ref = base_model or composition.base_model
    if not model_ref:
        from atmoe.errors import ModelLoadError

        raise ModelLoadError(f"composition {composition.ref} records no base model: pass --base-model")
    base, tokenizer = load_base_model(model_ref, revision=composition.base_revision, dtype=dtype)
    adapters = {
        group: {m.expert.name: _adapter(m.expert, files[m.expert.name]) for m in members}
        for group, members in groups.items()
    }
    general = _adapter(composition.general_expert, general_files) if general_files is not None else None
    model = build_atmoe(base, adapters, general=general, config=composition_config(composition))
    if router_bytes is not None:
        load_router_bytes(model, router_bytes)
    model.eval()
    return _built(composition, chosen, model, tokenizer, model_ref)


def load_router_bytes(model, data: bytes) -> None:
    from safetensors.torch import load as load_safetensors

    model.load_router_state_dict(load_safetensors(data))


def router_bytes(model, metadata: dict[str, str] | None = None) -> bytes:
    """The router's weights as safetensors bytes (what the store keeps)."""
    from safetensors.torch import save as save_safetensors

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.router_state_dict().items()}
    return save_safetensors(state, metadata=metadata)


def _built(composition: Composition, router: Router | None, model, tokenizer, model_ref: str) -> Built:
    return Built(
        model=model,
        tokenizer=tokenizer,
        composition=composition.ref,
        router=f"{composition.ref}:{router.number}" if router is not None else None,
        experts={m.expert.name: m.expert.ref for m in composition.members},
        general=composition.general_expert.ref if composition.general_expert else None,
        base_model=model_ref,
    )


@contextmanager
def expert_folders(session: Session, store: Store, ref: str) -> Iterator[dict[str, Path]]:
    """The verified adapter folders of a composition's experts ({name: dir}, the general expert as
    ``__general__``), written to a temporary directory that is removed on exit: what PEFT loads."""
    import tempfile

    from atmoe.registry.routers import resolve_router

    composition, _ = resolve_router(session, ref, required=False)
    experts = {m.expert.name: m.expert for m in composition.members}
    if composition.general_expert is not None:
        experts["__general__"] = composition.general_expert
    files = {name: _expert_bytes(store, expert) for name, expert in experts.items()}  # all verified first
    with tempfile.TemporaryDirectory(prefix="atmoe-experts-") as root:
        folders = {}
        for index, (name, blobs) in enumerate(files.items()):
            folder = Path(root) / str(index)
            folder.mkdir()
            for path, data in blobs.items():
                (folder / path).write_bytes(data)
            folders[name] = folder
        yield folders
