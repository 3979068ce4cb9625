"""Archive commands: export, import (``gc`` lives with the expert commands)."""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.options import json_option


def _size(text: str, flag: str) -> int:
    """``4G``, ``512M``, ``100k`` or a number of bytes."""
    from atmoe.errors import UsageError

    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (value[:-1], value[-1]) if value[-1:] in units and value[-1:] else (value, "")
    if not number.isdigit():
        raise UsageError(f"{flag} {text!r}: expected bytes, e.g. 4G, 512M or 1048576")
    return int(number) * units[unit]


@main.command("export")
@click.argument("refs", nargs=-1, metavar="REF...")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE.tar[.gz]",
    help="Archive to write (gzip-compressed when it ends in .gz or .tgz).",
)
@click.option("--all", "everything", is_flag=True, help="Export the whole catalog.")
@json_option
def export(refs: tuple[str, ...], out: str, everything: bool, as_json: bool) -> None:
    """Write experts and compositions (NAME: every version; NAME@VERSION) with their blobs to an archive.

    A composition brings the experts it pins and its routers and aliases.
    """
    from atmoe.registry.archive import export_archive

    report = export_archive(get_registry(), refs, out, everything=everything)
    if as_json:
        output.print_json(report.to_dict())
        return
    output.message(
        f"Exported {len(report.experts)} experts, {len(report.compositions)} compositions, "
        f"{len(report.routers)} routers ({report.blobs} blobs, {output.human_size(report.bytes)}) to {report.path}"
    )


@main.command("import")
@click.argument("archive", metavar="FILE")
@click.option(
    "--max-members",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Refuse an archive with more members than this.",
)
@click.option(
    "--max-member-size",
    default="4G",
    show_default=True,
    metavar="SIZE",
    help="Refuse an archive with a member larger than this (bytes, or 512M, 4G, ...).",
)
@click.option(
    "--max-total-size",
    default="64G",
    show_default=True,
    metavar="SIZE",
    help="Refuse an archive whose members add up to more than this, uncompressed (bytes, or 512M, 4G, ...).",
)
@click.option("--dry-run", is_flag=True, help="Check the whole archive, write nothing.")
@json_option
def import_command(
    archive: str, max_members: int, max_member_size: str, max_total_size: str, dry_run: bool, as_json: bool
) -> None:
    """Check an archive completely (paths, links, sizes, checksums, adapters), then add what it holds.

    Experts already present with the same content are reused; new content under a known name becomes
    its next version.
    """
    from atmoe.registry.archive import import_archive

    report = import_archive(
        get_registry(),
        archive,
        max_members=max_members,
        max_member_size=_size(max_member_size, "--max-member-size"),
        max_total_size=_size(max_total_size, "--max-total-size"),
        dry_run=dry_run,
    )
    if as_json:
        output.print_json(report.to_dict())
        return
    if dry_run:
        output.message(
            f"{archive} is sound: {len(report.experts_added)} experts, {len(report.compositions_added)} "
            f"compositions, {report.blobs} blobs (nothing written)"
        )
        return
    output.message(
        f"Imported from {archive}: experts {len(report.experts_added)} new, {len(report.experts_existing)} already "
        f"present; compositions {len(report.compositions_added)} new, {len(report.compositions_existing)} already "
        f"present; routers {len(report.routers_added)} new, {len(report.routers_existing)} already present"
    )
