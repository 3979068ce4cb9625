"""Routers of a composition version: numbered 1, 2, ... with their lineage, and movable aliases.

A router's weights are a safetensors blob in the store; its row records the training data digest,
hyperparameters, metrics and library versions, so any answer traces back to what trained it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.errors import RouterNotFound
from atmoe.registry import events, roles
from atmoe.registry.compositions import get_composition, refuse_version_alias
from atmoe.registry.models import Composition, Router, RouterAlias
from atmoe.registry.names import Ref, parse_ref, validate_alias
from atmoe.registry.records import RouterRecord

LIBRARIES = ("atmoe-registry", "torch", "transformers", "peft", "accelerate", "safetensors")


def current_library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a router's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def record_router(
    session: Session,
    composition: Composition,
    *,
    blob_digest: str,
    data_digest: str | None,
    eval_data_digest: str | None,
    hyperparameters: dict,
    metrics: dict,
    created_by: str | None = None,
    notes: str | None = None,
    library_versions: dict[str, str] | None = None,
    created_at: datetime | None = None,
) -> Router:
    """The one insertion of a router row (train-router and import): the next router number of
    ``composition``; the blob must already be in the store. ``library_versions`` default to this
    process's (``current_library_versions``)."""
    from atmoe.registry.db import next_value

    router = Router(
        composition=composition,
        number=next_value(session, Router.number, Router.composition_id == composition.id),
        blob_digest=blob_digest,
        data_digest=data_digest,
        eval_data_digest=eval_data_digest,
        hyperparameters=hyperparameters,
        metrics=metrics,
        library_versions=library_versions if library_versions is not None else current_library_versions(),
        created_by=created_by,
        notes=notes,
    )
    if created_at is not None:
        router.created_at = created_at
    session.add(router)
    session.flush()
    return router


def check_alias_move(session: Session, composition_name: str, alias: str) -> None:
    """Refuse an alias this role may not set (before a router is trained for it): a new alias is a
    writer's right, moving an existing one an admin's."""
    validate_alias(alias, "router")
    if _alias_row(session, composition_name, alias) is None:
        roles.require(session, "set a new router alias")
    else:
        roles.require(session, "move a router alias")


def _alias_row(session: Session, composition_name: str, alias: str) -> RouterAlias | None:
    return session.scalars(
        select(RouterAlias).where(RouterAlias.composition_name == composition_name, RouterAlias.alias == alias)
    ).first()


def set_alias(session: Session, composition_name: str, alias: str, router: Router) -> RouterAlias:
    """Point ``alias`` (e.g. ``prod``) at ``router``; an existing alias moves. Logged as an ``alias``
    event unless it already pointed there."""
    validate_alias(alias, "router")
    row = _alias_row(session, composition_name, alias)
    if row is not None and row.router_id == router.id:
        return row
    previous = None if row is None else f"{row.router.composition.ref}:{row.router.number}"
    if row is None:
        roles.require(session, "set a new router alias")
        row = RouterAlias(composition_name=composition_name, alias=alias, router=router)
        session.add(row)
    else:
        roles.require(session, "move a router alias")
        row.router = router
    session.flush()
    target = f"{router.composition.ref}:{router.number}"
    events.record(session, "alias", f"{composition_name}:{alias}", {"to": target, "from": previous})
    return row


def resolve_router(session: Session, ref: Ref | str, *, required: bool = True) -> tuple[Composition, Router | None]:
    """The composition and router that ``NAME[@VERSION][:ROUTER]`` names.

    Without ``:ROUTER`` the composition's newest router is used (None when it has none and
    ``required`` is false). An alias carries its own composition version: ``medqa:prod`` resolves
    to the version the alias points into, and ``medqa@2:prod`` insists on version 2.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    refuse_version_alias(ref)
    if isinstance(ref.router, str):
        alias = session.scalars(
            select(RouterAlias).where(RouterAlias.composition_name == ref.name, RouterAlias.alias == ref.router)
        ).first()
        if alias is None:
            raise RouterNotFound(f"no router alias {ref.router!r} for composition {ref.name}")
        router = alias.router
        if ref.version is not None and router.composition.version != ref.version:
            raise RouterNotFound(
                f"alias {ref.router!r} points at {router.composition.ref}, not {ref.name}@{ref.version}"
            )
        return router.composition, router
    composition = get_composition(session, ref)
    query = select(Router).where(Router.composition_id == composition.id)
    if ref.router is None:
        router = session.scalars(query.order_by(Router.number.desc()).limit(1)).first()
        if router is None and required:
            raise RouterNotFound(
                f"composition {composition.ref} has no trained router: run `atmoe-reg train-router {composition.ref} --data FILE`"
            )
        return composition, router
    router = session.scalars(query.where(Router.number == ref.router)).first()
    if router is None:
        raise RouterNotFound(f"composition {composition.ref} has no router {ref.router}")
    return composition, router


def list_routers(session: Session, ref: Ref | str) -> tuple[Composition, list[Router]]:
    composition = get_composition(session, ref)
    routers = list(
        session.scalars(select(Router).where(Router.composition_id == composition.id).order_by(Router.number))
    )
    return composition, routers


def aliases_of(session: Session, router: Router) -> list[str]:
    return list(
        session.scalars(select(RouterAlias.alias).where(RouterAlias.router_id == router.id).order_by(RouterAlias.alias))
    )


def router_record(session: Session, router: Router) -> RouterRecord:
    """The typed record of a router (``routers --json`` prints its ``to_dict()``)."""
    return RouterRecord.from_row(router, aliases_of(session, router))
