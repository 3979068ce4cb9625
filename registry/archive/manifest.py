"""The manifest: the rows of an export, and their field-by-field check on import."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from atmoe.config import AtmoeConfig
from atmoe.errors import InvalidAdapter, InvalidArchive, UsageError
from atmoe.registry.archive.layout import BLOB_MEMBER, BLOB_PREFIX, FILE_NAME, FORMAT, FORMAT_VERSION, MANIFEST
from atmoe.registry.archive.reading import Staged, bad
from atmoe.registry.names import validate_name
from atmoe.registry.records import CompositionRecord, ExpertRecord

if TYPE_CHECKING:
    from atmoe.registry.models import Composition, Expert


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


# the expert fields an archive carries (the manifest format); the rest is re-derived on import
MANIFEST_EXPERT_KEYS = (
    "name", "version", "group", "domain", "style", "tags", "description", "base_model", "base_revision",
    "digest", "created_at", "created_by", "source", "files",
)  # fmt: skip


# the catalog's column lengths (registry/models.py): a longer value is refused here, before any
# blob is written, not by the database after
COLUMN_LIMITS = {"base_model": 512, "base_revision": 256, "created_by": 256}

# the router fields an archive carries; its number is re-assigned and its composition re-found on import
MANIFEST_ROUTER_KEYS = (
    "number", "blob_digest", "data_digest", "eval_data_digest", "hyperparameters", "metrics",
    "library_versions", "created_at", "created_by", "notes", "aliases",
)  # fmt: skip


def expert_row(expert: Expert) -> dict[str, Any]:
    """An expert's manifest row: a projection of its ``ExpertRecord``."""
    record = ExpertRecord.from_row(expert).to_dict()
    return {key: record[key] for key in MANIFEST_EXPERT_KEYS}


def composition_row(session: Session, composition: Composition) -> dict[str, Any]:
    """A composition's manifest row, built from its ``CompositionRecord`` and ``RouterRecord`` s."""
    from atmoe.registry.routers import list_routers, router_record

    record = CompositionRecord.from_row(composition)
    _, routers = list_routers(session, record.ref)
    router_rows = [router_record(session, router).to_dict() for router in routers]
    return {
        "name": record.name,
        "version": record.version,
        "base_model": record.base_model,
        "base_revision": record.base_revision,
        "groups": list(record.groups),
        **record.config.to_columns(),
        "description": record.description,
        "created_at": _iso(record.created_at),
        "created_by": record.created_by,
        "general": (
            {"name": record.general.name, "version": record.general.version, "digest": record.general.digest}
            if record.general
            else None
        ),
        "members": [
            {"group": m.group, "slot": m.slot, "name": m.name, "version": m.version, "digest": m.digest}
            for m in record.members
        ],
        "routers": [{key: row[key] for key in MANIFEST_ROUTER_KEYS} for row in router_rows],
    }


# -- import: checking the manifest -------------------------------------------------------------------


class _Check:
    """Typed access to manifest fields; every problem is one InvalidArchive line naming the field."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive

    def fail(self, where: str, problem: str) -> InvalidArchive:
        return bad(self.archive, f"{MANIFEST}: {where}: {problem}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be an object")
        return value

    def lst(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "must be a list")
        return value

    def string(self, value: Any, where: str, *, optional: bool = False, limit: int = 1 << 16) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > limit:
            raise self.fail(where, f"must be a string of at most {limit} characters")
        if "\x00" in value:  # PostgreSQL refuses NUL in text: refused here, before any blob is written
            raise self.fail(where, "holds a NUL character")
        return value

    def integer(self, value: Any, where: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"must be an integer >= {minimum}, not {value!r}")
        return value

    def number(self, value: Any, where: str) -> float:
        import math

        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"must be a finite number, not {value!r}")
        return float(value)

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {value!r}")
        return value

    def name(self, value: Any, where: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"{what} must be a string")
        try:
            return validate_name(value, what)
        except UsageError as error:
            raise self.fail(where, str(error)) from None

    def digest(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise self.fail(where, f"not a sha256 digest: {value!r}")
        return value

    def moment(self, value: Any, where: str) -> datetime | None:
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(self.string(value, where, limit=64) or "")
        except ValueError:
            raise self.fail(where, f"not an ISO time: {value!r}") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    def plain(self, value: Any, where: str) -> dict[str, Any]:
        """A JSON object of plain data (hyperparameters, metrics, ...), with no NUL in any string
        (PostgreSQL refuses NUL in JSON text: refused here, before any blob is written)."""
        checked = self.obj(value if value is not None else {}, where)
        if "\\u0000" in json.dumps(checked):
            raise self.fail(where, "holds a NUL character")
        return checked


@dataclass
class PlannedExpert:
    row: dict[str, Any]
    info: Any  # validate.AdapterInfo
    files: list[tuple[str, str, int]]  # (path, sha256, size)


def check_manifest(
    staged: Staged, archive: Path, work: Path
) -> tuple[dict[str, str | None], list[PlannedExpert], list[dict[str, Any]]]:
    from atmoe.registry.experts import _check_tags, content_digest
    from atmoe.registry.validate import read_safetensors_header, validate_adapter

    c = _Check(archive)
    manifest = staged.manifest
    if manifest.get("format") != FORMAT:
        raise bad(archive, f"{MANIFEST}: format is {manifest.get('format')!r}, not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(
            archive,
            f"{MANIFEST}: format_version {manifest.get('format_version')!r} is unknown to this atmoe-reg "
            f"(it reads {FORMAT_VERSION}): upgrade atmoe-registry",
        )
    members = c.obj(manifest.get("members"), "members")
    for name, entry in members.items():
        match = BLOB_MEMBER.match(name) if isinstance(name, str) else None
        if match is None:
            raise c.fail("members", f"unexpected member name {name!r}")
        entry = c.obj(entry, f"members[{name!r}]")
        if c.digest(entry.get("sha256"), f"members[{name!r}].sha256") != match[1]:
            raise c.fail(f"members[{name!r}]", "sha256 differs from the member's name")
        if match[1] not in staged.blobs:
            raise c.fail(f"members[{name!r}]", "is listed but not in the archive")
        size = c.integer(entry.get("size"), f"members[{name!r}].size")
        if staged.blobs[match[1]].stat().st_size != size:
            raise c.fail(f"members[{name!r}]", f"the member's size differs from the manifest's {size}")
    listed = {name.rsplit("/", 1)[1] for name in members}
    unlisted = sorted(set(staged.blobs) - listed)
    if unlisted:
        raise c.fail("members", f"the archive holds {BLOB_PREFIX}{unlisted[0]}, which the manifest does not list")

    groups: dict[str, str | None] = {}
    for i, row in enumerate(c.lst(manifest.get("groups", []), "groups")):
        row = c.obj(row, f"groups[{i}]")
        groups[c.name(row.get("name"), f"groups[{i}].name", "group")] = c.string(
            row.get("description"), f"groups[{i}].description", optional=True
        )

    experts: list[PlannedExpert] = []
    seen: dict[tuple[str, int], str] = {}
    for i, row in enumerate(c.lst(manifest.get("experts", []), "experts")):
        where = f"experts[{i}]"
        row = c.obj(row, where)
        name = c.name(row.get("name"), f"{where}.name", "expert name")
        version = c.integer(row.get("version"), f"{where}.version", minimum=1)
        label = f"{name}@{version}"
        if (name, version) in seen:
            raise c.fail(where, f"{label} appears twice")
        group = c.name(row.get("group"), f"{where}.group", "group")
        groups.setdefault(group, None)
        for key in ("domain", "style"):
            if row.get(key) not in (None, ""):
                c.name(row.get(key), f"{where}.{key}", key)
        try:
            row["tags"] = _check_tags(c.plain(row.get("tags"), f"{where}.tags"))
        except UsageError as error:
            raise c.fail(where, str(error)) from None
        for key in ("description", "base_model", "base_revision", "created_by", "source"):
            c.string(row.get(key), f"{where}.{key}", optional=True, limit=COLUMN_LIMITS.get(key, 1 << 16))
        row["created_at"] = c.moment(row.get("created_at"), f"{where}.created_at")
        digest = c.digest(row.get("digest"), f"{where}.digest")
        files: list[tuple[str, str, int]] = []
        paths: set[str] = set()
        for j, entry in enumerate(c.lst(row.get("files"), f"{where}.files")):
            entry = c.obj(entry, f"{where}.files[{j}]")
            path = c.string(entry.get("path"), f"{where}.files[{j}].path", limit=255) or ""
            if not FILE_NAME.match(path) or path in paths:
                raise c.fail(f"{where}.files[{j}]", f"file name {path!r} is not a plain, unique file name")
            paths.add(path)
            sha = c.digest(entry.get("sha256"), f"{where}.files[{j}].sha256")
            if sha not in staged.blobs:
                raise c.fail(f"{where}.files[{j}]", f"blob sha256:{sha} is not in the archive")
            size = c.integer(entry.get("size"), f"{where}.files[{j}].size")
            if staged.blobs[sha].stat().st_size != size:
                raise c.fail(f"{where}.files[{j}]", f"size {size} differs from the blob's")
            files.append((path, sha, size))
        if content_digest((p, s) for p, s, _ in files) != digest:
            raise c.fail(where, f"{label}: the content digest does not match its files")
        # the expert's files, laid out as an adapter directory, go through add-expert's validation
        adapter_dir = work / f"expert-{i}"
        adapter_dir.mkdir()
        for path, sha, _ in files:
            try:
                os.link(staged.blobs[sha], adapter_dir / path)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(staged.blobs[sha], adapter_dir / path)
        try:
            info = validate_adapter(adapter_dir, check_values=True)
        except InvalidAdapter as error:
            raise bad(archive, f"expert {label}: {error}") from None
        seen[(name, version)] = digest
        experts.append(PlannedExpert(row=row, info=info, files=files))

    compositions: list[dict[str, Any]] = []
    seen_compositions: set[tuple[str, int]] = set()
    for i, row in enumerate(c.lst(manifest.get("compositions", []), "compositions")):
        where = f"compositions[{i}]"
        row = c.obj(row, where)
        name = c.name(row.get("name"), f"{where}.name", "composition name")
        version = c.integer(row.get("version"), f"{where}.version", minimum=1)
        if (name, version) in seen_compositions:
            raise c.fail(where, f"{name}@{version} appears twice")
        seen_compositions.add((name, version))
        group_names = [c.name(g, f"{where}.groups", "group") for g in c.lst(row.get("groups"), f"{where}.groups")]
        if not group_names or len(set(group_names)) != len(group_names):
            raise c.fail(f"{where}.groups", "must list distinct groups")
        for key in ("base_model", "base_revision", "description", "created_by"):
            c.string(row.get(key), f"{where}.{key}", optional=True, limit=COLUMN_LIMITS.get(key, 1 << 16))
        row["created_at"] = c.moment(row.get("created_at"), f"{where}.created_at")
        c.number(row.get("lam"), f"{where}.lam")
        c.number(row.get("temperature"), f"{where}.temperature")
        c.flag(row.get("learn_lambda"), f"{where}.learn_lambda")
        c.plain(row.get("options"), f"{where}.options")
        try:  # the one definition of what a composition's settings may be
            row["config"] = AtmoeConfig.from_columns(row, general=row.get("general") is not None)
        except UsageError as error:
            raise c.fail(where, str(error)) from None

        def pinned(entry: Any, at: str) -> tuple[str, int]:
            entry = c.obj(entry, at)
            key = (
                c.name(entry.get("name"), f"{at}.name", "expert name"),
                c.integer(entry.get("version"), f"{at}.version", minimum=1),
            )
            if key not in seen:
                raise c.fail(at, f"pins {key[0]}@{key[1]}, which the archive does not hold")
            if c.digest(entry.get("digest"), f"{at}.digest") != seen[key]:
                raise c.fail(at, f"the digest pinned for {key[0]}@{key[1]} differs from the expert's")
            return key

        slots: dict[str, list[int]] = {g: [] for g in group_names}
        member_keys: list[tuple[str, int]] = []
        for j, entry in enumerate(c.lst(row.get("members"), f"{where}.members")):
            at = f"{where}.members[{j}]"
            member_keys.append(pinned(entry, at))
            group = c.name(entry.get("group"), f"{at}.group", "group")
            if group not in slots:
                raise c.fail(at, f"group {group!r} is not one of the composition's groups")
            slots[group].append(c.integer(entry.get("slot"), f"{at}.slot"))
        for group, group_slots in slots.items():
            if sorted(group_slots) != list(range(len(group_slots))) or not group_slots:
                raise c.fail(where, f"group {group!r} has slots {group_slots}, expected 0..n-1")
        if len({k[0] for k in member_keys}) != len(member_keys):
            raise c.fail(where, "pins one expert name twice")
        if row.get("general") is not None:
            pinned(row.get("general"), f"{where}.general")
        numbers: set[int] = set()
        for j, router in enumerate(c.lst(row.get("routers", []), f"{where}.routers")):
            at = f"{where}.routers[{j}]"
            router = c.obj(router, at)
            number = c.integer(router.get("number"), f"{at}.number", minimum=1)
            if number in numbers:
                raise c.fail(at, f"router {number} appears twice")
            numbers.add(number)
            blob = c.digest(router.get("blob_digest"), f"{at}.blob_digest")
            if blob not in staged.blobs:
                raise c.fail(at, f"router blob sha256:{blob} is not in the archive")
            try:
                read_safetensors_header(staged.blobs[blob])
            except InvalidAdapter as error:
                raise c.fail(at, f"router weights are not a safetensors file ({error})") from None
            for key in ("data_digest", "eval_data_digest"):
                if router.get(key) is not None:
                    c.digest(router.get(key), f"{at}.{key}")
            for key in ("hyperparameters", "metrics", "library_versions"):
                c.plain(router.get(key), f"{at}.{key}")
            c.string(router.get("created_by"), f"{at}.created_by", optional=True, limit=COLUMN_LIMITS["created_by"])
            c.string(router.get("notes"), f"{at}.notes", optional=True)
            router["created_at"] = c.moment(router.get("created_at"), f"{at}.created_at")
            for k, alias in enumerate(c.lst(router.get("aliases", []), f"{at}.aliases")):
                c.name(alias, f"{at}.aliases[{k}]", "alias")
        compositions.append(row)
    return groups, experts, compositions
