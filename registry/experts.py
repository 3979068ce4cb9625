"""Expert services: add, list, show, remove (groups are in ``groups.py``; verify and gc of the store,
which concern every blob, in ``integrity.py``).

(Somewhat over 400 lines: adding, listing and removing share the name, tag and label rules and the
expert queries kept here.)

Every function takes the ``Registry`` (for its sessions and store) or a ``Session``; the
``Registry`` facade and the CLI are thin layers over these.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, delete, or_, select, text
from sqlalchemy.orm import Session, lazyload, selectinload

from atmoe.errors import ExpertNotFound, GroupConflict, InUse, InvalidAdapter, UsageError
from atmoe.hub import is_hub_source, parse_hub_ref
from atmoe.registry import events, listing, roles
from atmoe.registry.db import next_value
from atmoe.registry.expert_aliases import aliased_expert, aliases_of
from atmoe.registry.groups import get_group
from atmoe.registry.listing import ExpertFilter
from atmoe.registry.models import Composition, CompositionExpert, Expert, ExpertAlias, ExpertFile, Group
from atmoe.registry.names import Ref, canonical_base_model, parse_ref, validate_name
from atmoe.registry.records import ExpertRecord

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry
    from atmoe.registry.store import StoredBlob
    from atmoe.registry.validate import AdapterInfo

MAX_TAG_VALUE = 256


# -- helpers -------------------------------------------------------------------------------------


def content_digest(manifest: Iterable[tuple[str, str]]) -> str:
    """sha256 of the manifest in ``sha256sum`` format (``SHA256  PATH`` lines, sorted by path).

    ``(cd DIR && sha256sum * | LC_ALL=C sort -k2 | sha256sum)`` gives the same digest.
    """
    lines = "".join(f"{sha256}  {path}\n" for path, sha256 in sorted(manifest))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time stored is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def current_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return None


def base_model_columns(
    reference: str | None, revision: str | None, adapter_revision: str | None
) -> tuple[str | None, str | None]:
    """``(base_model, base_revision)`` for a new expert: ``reference`` (``--base-model`` or the
    adapter's base_model_name_or_path) canonical, and the revision that ``--base-revision``, an
    ``hf://ORG/REPO@REV`` reference or the adapter config names, in that order; a reference and
    ``--base-revision`` naming two revisions is a ``UsageError``."""
    named = parse_hub_ref(reference, subfolder=False).revision if is_hub_source(reference) else None
    if named is not None and revision is not None and named != revision:
        raise UsageError(f"base model {reference!r} names revision {named!r} but --base-revision is {revision!r}")
    return canonical_base_model(reference), revision or named or adapter_revision


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``["team=gi", "stage=prod"]`` -> ``{"team": "gi", "stage": "prod"}``."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"tag {item!r} is not KEY=VALUE")
        tags[validate_name(key, "tag key")] = value
    return tags


def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in (tags or {}).items():
        validate_name(key, "tag key")
        if not isinstance(value, str):
            raise UsageError(f"tag {key!r}: value must be a string, not {value!r}")
        if len(value) > MAX_TAG_VALUE or "\n" in value:
            raise UsageError(f"tag {key!r}: value must be one line of at most {MAX_TAG_VALUE} characters")
        result[key] = value
    return result


def _label(value: str | None, what: str) -> str | None:
    return None if value is None or value == "" else validate_name(value, what)


# -- add -----------------------------------------------------------------------------------------


def _store_adapter(registry: Registry, info: AdapterInfo) -> list[tuple[str, StoredBlob]]:
    """Stream the adapter's files into the store, weights first; returns [(path, blob)]."""
    from atmoe.registry.validate import WEIGHTS_FILE, FiniteCheck

    store = registry.store
    assert info.header is not None
    check = FiniteCheck(info.header, WEIGHTS_FILE)
    weights = store.put_file(info.path / WEIGHTS_FILE, inspect=check)
    check.finish()
    stored = [(WEIGHTS_FILE, weights)]
    for name in info.files:
        if name != WEIGHTS_FILE:
            stored.append((name, store.put_file(info.path / name)))
    return sorted(stored)


def _check_stored(registry: Registry, info: AdapterInfo, stored: list[tuple[str, StoredBlob]]) -> None:
    """The files may have changed between validation and copying: what is stored must be what was
    validated (cheap: a header and a small JSON file). Called inside the insert transaction, under
    the blob lock, where the blobs are known to be in place (a gc cannot remove them there)."""
    from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE, read_safetensors_header

    blobs = dict(stored)
    if read_safetensors_header(registry.store.local_path(blobs[WEIGHTS_FILE].digest)) != info.header:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: changed while it was being added; try again")
    config_bytes = registry.store.local_path(blobs[CONFIG_FILE].digest).read_bytes()
    if json.loads(config_bytes) != info.config:
        raise InvalidAdapter(f"{CONFIG_FILE}: changed while it was being added; try again")


def adapter_columns(info: AdapterInfo) -> dict[str, Any]:
    """The Expert columns that come from the validated adapter itself (add-expert and import)."""
    return {
        "peft_type": info.peft_type,
        "r": info.r,
        "alpha": info.alpha,
        "use_rslora": info.use_rslora,
        "target_modules": info.target_modules,
        "module_ranks": info.module_ranks,
        "rank_pattern": info.rank_pattern,
        "alpha_pattern": info.alpha_pattern,
    }


def add_expert(
    registry: Registry,
    path: str | Path,
    *,
    name: str,
    group: str,
    domain: str | None = None,
    style: str | None = None,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    created_by: str | None = None,
    source: str | None = None,
) -> tuple[ExpertRecord, bool]:
    """Validate and add a PEFT LoRA directory, or ``hf://ORG/REPO[@REVISION][/SUBFOLDER]``, as the
    next version of ``name``.

    Returns ``(expert, created)``; ``created`` is False when identical content is already a
    version of ``name`` (no new version is made). Blobs are in place before the row is committed.
    ``source`` defaults to the folder's absolute path, or ``hf://ORG/REPO@<commit>[/SUBFOLDER]``:
    the commit the revision resolved to (see ``atmoe.hub``; only the adapter's two files are fetched).
    """
    hub = parse_hub_ref(path) if is_hub_source(path) else None  # a malformed source fails first
    validate_name(name, "expert name")
    validate_name(group, "group")
    domain = _label(domain, "domain")
    style = _label(style, "style")
    clean_tags = _check_tags(tags)
    base_model_columns(base_model, base_revision, None)  # a malformed --base-model fails before any fetch

    with registry.session() as session:
        get_group(session, group)
        roles.require(session, "add experts")  # before any blob is written (or fetched)
    columns: dict[str, Any] = {
        "name": name,
        "group": group,
        "domain": domain,
        "style": style,
        "tags": clean_tags,
        "description": description,
        "base_model": base_model,
        "base_revision": base_revision,
        "created_by": created_by if created_by is not None else current_user(),
    }
    if hub is None:
        folder = Path(path)
        return _add_folder(registry, folder, source=source if source is not None else str(folder.resolve()), **columns)
    from atmoe.hub import staged_adapter

    with staged_adapter(hub) as staged:
        try:
            return _add_folder(registry, staged.path, source=source if source is not None else staged.source, **columns)
        except InvalidAdapter as error:  # the staging folder's name would mean nothing to the user
            raise type(error)(f"{staged.source}: {error}") from None


def _add_folder(
    registry: Registry,
    folder: Path,
    *,
    name: str,
    group: str,
    domain: str | None,
    style: str | None,
    tags: dict[str, str],
    description: str | None,
    base_model: str | None,
    base_revision: str | None,
    created_by: str | None,
    source: str,
) -> tuple[ExpertRecord, bool]:
    """``add_expert`` once its arguments are checked and the adapter is a folder on this machine."""
    from atmoe.registry.validate import validate_adapter  # numpy: only when adding

    info = validate_adapter(folder, check_values=False)
    model, revision = base_model_columns(base_model or info.base_model_name_or_path, base_revision, info.revision)
    stored = _store_adapter(registry, info)  # raises on NaN/Inf before the weights land
    digest = content_digest((p, blob.digest) for p, blob in stored)

    def insert(session: Session) -> tuple[ExpertRecord, bool]:
        _check_stored(registry, info, stored)
        existing = session.scalar(select(Expert).where(Expert.name == name, Expert.digest == digest))
        if existing is not None:
            return ExpertRecord.from_row(existing), False
        expert = insert_expert(
            session,
            name=name,
            group=get_group(session, group),
            info=info,
            digest=digest,
            files=[(p, blob.digest, blob.size) for p, blob in stored],
            domain=domain,
            style=style,
            tags=tags,
            description=description,
            base_model=model,
            base_revision=revision,
            created_by=created_by,
            source=source,
        )
        events.record(session, "add", expert.ref, {"group": group, "digest": digest, "files": len(stored),
                                                    "size": expert.size})  # fmt: skip
        return ExpertRecord.from_row(expert), True

    rewrite = {blob.digest: _rewriter(registry, info.path / name) for name, blob in stored}
    return registry.transact(insert, blobs=rewrite)


def _rewriter(registry: Registry, path: Path) -> Callable[[], Any]:
    return lambda: registry.store.put_file(path)


def insert_expert(
    session: Session,
    *,
    name: str,
    group: Group,
    info: AdapterInfo,
    digest: str,
    files: Sequence[tuple[str, str, int]],
    domain: str | None = None,
    style: str | None = None,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    created_by: str | None = None,
    source: str | None = None,
    created_at: datetime | None = None,
) -> Expert:
    """The one insertion of an expert row (add-expert and import): the next version of ``name``, its
    columns from the validated adapter, and its files ``(path, sha256, size)``, whose blobs must
    already be in the store. Every version of a name stays in one group (``GroupConflict``): a
    composition pins the latest version of each name per group, and two groups holding one name
    would make it pin the name twice."""
    current = session.scalar(
        select(Group.name).join(Expert, Expert.group_id == Group.id).where(Expert.name == name).limit(1)
    )
    if current is not None and current != group.name:
        raise GroupConflict(
            f"expert {name!r} is in group {current!r}; a new version cannot move to {group.name!r} "
            "(add it under another name, or remove the old versions first)"
        )
    expert = Expert(
        name=name,
        version=next_value(session, Expert.version, Expert.name == name),
        group=group,
        domain=domain,
        style=style,
        tags=dict(tags or {}),
        description=description,
        base_model=base_model,
        base_revision=base_revision,
        **adapter_columns(info),
        digest=digest,
        size=sum(size for _, _, size in files),
        created_by=created_by,
        source=source,
        files=[ExpertFile(path=p, sha256=s, size=n) for p, s, n in files],
    )
    if created_at is not None:
        expert.created_at = created_at
    session.add(expert)
    session.flush()
    return expert


# -- queries -------------------------------------------------------------------------------------


class SessionReader:
    """A listing ``Reader`` (``listing.py``) over a SQLAlchemy session: the same SQL as the command
    line's, run in the session's transaction."""

    paramstyle = "named"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.dialect = session.get_bind().dialect.name

    def execute(self, sql: str, params: Mapping[str, Any], *, stream: bool = False) -> Iterator[Sequence[Any]]:
        options = {"yield_per": 1000} if stream else {}
        connection = self.session.connection(execution_options=options or None)
        yield from connection.execute(text(sql), dict(params))


def list_experts(
    session: Session,
    *,
    group: str | None = None,
    domain: str | None = None,
    style: str | None = None,
    tag: str | Sequence[str] | Mapping[str, str] | None = None,
    base_model: str | None = None,
    search: str | None = None,
    with_files: bool = False,
) -> list[Expert]:
    """Experts (every version), ordered by name and version. ``tag``: "K=V", "K", or several;
    ``search``: free text (``search.py``). The filter is the listing's (``listing.ExpertFilter``)."""
    query = ExpertFilter.make(group=group, domain=domain, style=style, tag=tag, base_model=base_model, search=search)
    statement = select(Expert)
    if query.narrows:
        reader = SessionReader(session)
        sql, params = listing.ids_sql(query, dialect=reader.dialect, paramstyle=reader.paramstyle)
        statement = statement.where(Expert.id.in_(text(sql).bindparams(**params).columns(id=Integer)))
    loader = selectinload(Expert.files) if with_files else lazyload(Expert.files)
    return sorted(session.scalars(statement.options(loader)), key=lambda e: (e.name.encode(), e.version))


def expert_summaries(
    session: Session, *, limit: int | None = None, offset: int = 0, **filters: Any
) -> list[dict[str, Any]]:
    """Plain rows for listings (``listing.summaries``: no ORM objects, so 100,000 experts list in
    well under a second). Filters as in ``list_experts``; ``limit`` rows from ``offset``."""
    return list(listing.summaries(SessionReader(session), ExpertFilter.make(**filters), limit=limit, offset=offset))


def get_expert(session: Session, ref: str | Ref) -> Expert:
    """The expert of ``NAME``, ``NAME@VERSION``, ``NAME@latest`` or ``NAME@ALIAS`` (files loaded)."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    if parsed.router is not None:
        raise UsageError(f"expert reference {str(parsed)!r} takes no ':ROUTER' part")
    if parsed.alias is not None:
        return aliased_expert(session, parsed)
    statement = select(Expert).where(Expert.name == parsed.name).options(selectinload(Expert.files))
    if parsed.version is None:
        expert = session.scalar(statement.order_by(Expert.version.desc()).limit(1))
    else:
        expert = session.scalar(statement.where(Expert.version == parsed.version))
    if expert is None:
        versions = list(
            session.scalars(select(Expert.version).where(Expert.name == parsed.name).order_by(Expert.version))
        )
        if versions:
            known = ", ".join(str(v) for v in versions)
            raise ExpertNotFound(f"expert {parsed.name!r} has no version {parsed.version} (versions: {known})")
        raise ExpertNotFound(f"no expert named {parsed.name!r}; see atmoe-reg list")
    return expert


def expert_record(expert: Expert, *, files: bool = True) -> dict[str, Any]:
    """Everything the catalog knows about one expert version, JSON-ready (``ExpertRecord.to_dict``)."""
    return ExpertRecord.from_row(expert, files=files).to_dict()


# -- remove --------------------------------------------------------------------------------------


def pinning_compositions(session: Session, expert_ids: Sequence[int]) -> list[str]:
    """``name@version`` of every composition that pins one of the experts (member or general)."""
    members = select(CompositionExpert.composition_id).where(CompositionExpert.expert_id.in_(expert_ids))
    statement = (
        select(Composition.name, Composition.version)
        .where(or_(Composition.id.in_(members), Composition.general_expert_id.in_(expert_ids)))
        .order_by(Composition.name, Composition.version)
    )
    return [f"{n}@{v}" for n, v in session.execute(statement)]


def remove_expert(registry: Registry, ref: str, *, force: bool = False) -> list[str]:
    """Remove an expert version from the catalog; returns the removed ``name@version`` refs.

    ``NAME@VERSION`` (or ``NAME@latest``, ``NAME@ALIAS``) removes that version. A bare ``NAME`` removes
    the only version, or every version with ``force``. Refused with InUse while a composition pins
    one (compositions are immutable), or while an alias points at one unless ``force`` (which removes
    the alias too). Blobs stay in the store until ``gc``.
    """
    parsed = parse_ref(ref)

    def work(session: Session) -> list[str]:
        roles.require(session, "remove experts")
        if parsed.version is not None or "@" in ref:
            experts = [get_expert(session, parsed)]
        else:
            experts = list(session.scalars(select(Expert).where(Expert.name == parsed.name).order_by(Expert.version)))
            if not experts:
                get_expert(session, parsed)  # raises ExpertNotFound
            if len(experts) > 1 and not force:
                versions = ", ".join(str(e.version) for e in experts)
                raise UsageError(
                    f"expert {parsed.name!r} has versions {versions}: name one as "
                    f"{parsed.name}@VERSION, or pass --force to remove them all"
                )
        ids = [e.id for e in experts]
        pins = pinning_compositions(session, ids)
        if pins:
            refs = ", ".join(e.ref for e in experts)
            raise InUse(
                f"{refs} is pinned by composition {', '.join(pins)}; compositions are immutable, so remove those first"
            )
        aliases = aliases_of(session, ids)
        if aliases and not force:
            raise InUse(
                f"alias {', '.join(f'{a.ref} -> {a.target}' for a in aliases)} points at it; move it "
                "(atmoe-reg alias-expert), or pass --force to remove it too"
            )
        removed = [e.ref for e in experts]
        session.execute(delete(ExpertAlias).where(ExpertAlias.expert_id.in_(ids)))
        session.execute(delete(ExpertFile).where(ExpertFile.expert_id.in_(ids)))
        session.execute(delete(Expert).where(Expert.id.in_(ids)))
        for expert in experts:
            gone = [a.ref for a in aliases if a.version == expert.version]
            events.record(session, "remove", expert.ref, {"kind": "expert", "aliases": gone})
        return removed

    return registry.transact(work, attempts=1)
