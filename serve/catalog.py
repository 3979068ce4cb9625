"""The read-only catalog as JSON, for the page at ``/`` and for scripts: experts (searchable by
group, domain, style and free text), compositions with their pinned members and routers, and the
lineage of a router. Every function takes the ``Registry`` and returns plain data (the records'
``to_dict()``), and runs in a thread: the catalog is a database."""

from __future__ import annotations

from typing import Any

MAX_EXPERTS = 500


def _matches(record: dict[str, Any], words: list[str]) -> bool:
    haystack = " ".join(
        str(value)
        for value in (
            record["name"],
            record["group"],
            record["domain"] or "",
            record["style"] or "",
            record["description"] or "",
            *(f"{k}={v}" for k, v in record["tags"].items()),
        )
    ).lower()
    return all(word in haystack for word in words)


def experts(
    registry: Any,
    *,
    q: str | None = None,
    group: str | None = None,
    domain: str | None = None,
    style: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Expert versions matching every word of ``q`` (name, group, domain, style, description, tags)
    and the facets given; ``total`` counts them all, ``experts`` holds the first ``limit``."""
    records = [
        r.to_dict() for r in registry.list_experts(group=group or None, domain=domain or None, style=style or None)
    ]
    words = (q or "").lower().split()
    found = [r for r in records if _matches(r, words)] if words else records
    facets = {
        "groups": sorted({r["group"] for r in records}),
        "domains": sorted({r["domain"] for r in records if r["domain"]}),
        "styles": sorted({r["style"] for r in records if r["style"]}),
    }
    return {"total": len(found), "experts": found[: max(0, min(limit, MAX_EXPERTS))], "facets": facets}


def compositions(registry: Any) -> list[dict[str, Any]]:
    """Every composition version with its pinned members and its routers (metrics, aliases, digests)."""
    listed = []
    for composition in registry.compositions():
        record = composition.to_dict()
        record["routers"] = [router.to_dict() for router in registry.routers(composition.ref)]
        listed.append(record)
    return listed


def router_lineage(registry: Any, ref: str) -> dict[str, Any]:
    """What a router ``NAME@VERSION:ROUTER`` (or an alias) came from: its record (data digests,
    hyperparameters, metrics, library versions), its composition and the pinned experts' records."""
    from atmoe.errors import RouterNotFound
    from atmoe.registry.names import parse_ref
    from atmoe.registry.routers import resolve_router

    parsed = parse_ref(ref)
    if parsed.router is None:
        raise RouterNotFound(f"{ref!r} names no router: use NAME[@VERSION]:ROUTER")
    with registry.session() as session:
        composition_row, router_row = resolve_router(session, parsed)
        composition_ref, number = composition_row.ref, router_row.number
    composition = registry.composition(composition_ref)
    router = next(r for r in registry.routers(composition_ref) if r.number == number)
    members = [registry.get_expert(member.ref).to_dict() for member in composition.members]
    general = registry.get_expert(composition.general.ref).to_dict() if composition.general else None
    return {"router": router.to_dict(), "composition": composition.to_dict(), "experts": members, "general": general}
