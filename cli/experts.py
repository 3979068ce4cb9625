"""Expert commands: add-expert, list, show, verify, remove, groups, gc."""

from __future__ import annotations

from typing import Any

import click

from atmoe.cli import output
from atmoe.cli.app import EXIT_FAILURE, EXIT_USAGE, fail, get_reader, get_registry, main, one_line
from atmoe.cli.options import json_option
from atmoe.hub import is_hub_source


def _tags(values: tuple[str, ...]) -> dict[str, str]:
    from atmoe.registry.experts import parse_tags

    return parse_tags(values)


@main.command("add-expert")
@click.argument("path", metavar="PATH")
@click.option("--name", required=True, help="Expert name; adding new content under it makes a new version.")
@click.option("--group", required=True, help="Group (functional, domain, style, general, or one you added).")
@click.option("--domain", help="Catalog facet: the expert's domain, e.g. gastroenterology.")
@click.option("--style", help="Catalog facet: the expert's answer style, e.g. rigorous.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Free tag (repeatable).")
@click.option("--description", help="What the expert was trained on and for.")
@click.option("--base-model", help="Base model reference (default: base_model_name_or_path of the adapter).")
@click.option("--base-revision", help="Base model revision (default: revision of the adapter config).")
@json_option
def add_expert(
    path: str,
    name: str,
    group: str,
    domain: str | None,
    style: str | None,
    tags: tuple[str, ...],
    description: str | None,
    base_model: str | None,
    base_revision: str | None,
    as_json: bool,
) -> None:
    """Validate a PEFT LoRA directory (safetensors only) and add it to the catalog.

    PATH is a folder, or hf://ORG/REPO[@REVISION][/SUBFOLDER] on the Hugging Face Hub: its
    adapter_config.json and adapter_model.safetensors are read from the local Hub cache (fetched
    only with --allow-downloads), and the source is recorded with the commit it resolved to."""
    tag_map = _tags(tags)
    registry = get_registry()
    expert, created = registry.add_expert(
        path,
        name=name,
        group=group,
        domain=domain,
        style=style,
        tags=tag_map,
        description=description,
        base_model=base_model,
        base_revision=base_revision,
    )
    if as_json:
        output.print_json(
            {
                "ref": expert.ref,
                "name": expert.name,
                "version": expert.version,
                "created": created,
                "digest": expert.digest,
                "source": expert.source,
            }
        )
        return
    if created:
        origin = f" from {expert.source}" if is_hub_source(path) else ""
        output.message(
            f"Added {expert.ref} to group {expert.group}{origin} "
            f"(sha256:{output.short_digest(expert.digest)}, {len(expert.files)} files, "
            f"{output.human_size(expert.size)})"
        )
    else:
        output.message(f"Identical content is already {expert.ref}: no new version")


@main.command("list")
@click.option("--group", help="Only experts of this group.")
@click.option("--domain", help="Only experts of this domain.")
@click.option("--style", help="Only experts of this style.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Only experts with this tag (K=V or K; repeatable).")
@click.option("--base-model", help="Only experts of this base model.")
@click.option(
    "--search",
    metavar="TEXT",
    help="Only experts whose name, description, domain, style or tags hold every word of TEXT (as a word's start).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help=f"Show N rows (default: one screen on a terminal, {output.PIPED_PAGE_ROWS} when piped; --json: every row).",
)
@click.option("--offset", type=click.IntRange(min=0), default=0, metavar="N", help="Skip the first N rows.")
@click.option("--all", "all_rows", is_flag=True, help="Show every row.")
@json_option
def list_command(
    group: str | None,
    domain: str | None,
    style: str | None,
    tags: tuple[str, ...],
    base_model: str | None,
    search: str | None,
    limit: int | None,
    offset: int,
    all_rows: bool,
    as_json: bool,
) -> None:
    """List experts (every version), by name and version, one screen at a time."""
    from atmoe.registry import listing

    if all_rows and limit is not None:
        fail("--limit and --all exclude each other (--all shows every row)", EXIT_USAGE)
    query = listing.ExpertFilter.make(
        group=group, domain=domain, style=style, tag=list(tags), base_model=base_model, search=search
    )
    reader = get_reader()
    if as_json and limit is None:  # data for a program: every row, streamed
        output.print_json_rows(listing.summaries(reader, query, offset=offset, stream=True))
        return
    page = None if all_rows else limit or output.screen_rows()
    rows = list(listing.summaries(reader, query, limit=page, offset=offset, stream=page is None))
    total = listing.count(reader, query) if offset or (page is not None and len(rows) == page) else len(rows)
    if as_json:
        output.print_json(rows)
    elif rows:
        output.print_table(
            ["ref", "group", "domain", "style", "tags", "base model", "r", "digest", "size"],
            [
                [
                    f"{r['name']}@{r['version']}",
                    r["group"],
                    r["domain"] or "",
                    r["style"] or "",
                    ",".join(f"{k}={v}" for k, v in r["tags"].items()) if r["tags"] else "",
                    r["base_model"] or "",
                    str(r["r"]),
                    r["digest"][: output.DIGEST_CHARS],
                    output.human_size(r["size"]),
                ]
                for r in rows
            ],
        )
    if rows and (offset or total > len(rows)):
        last = offset + len(rows)
        more = f"; more with --offset {last}, --limit N or --all" if total > last else ""
        output.message(f"Showing {offset + 1}-{last} of {total} experts{more}")
    elif not rows and not as_json:
        if offset and total:
            output.message(f"Nothing past --offset {offset}: {total} experts match")
        else:
            output.message(
                "No experts match." if query.narrows else "No experts yet: add one with atmoe-reg add-expert"
            )


@main.command("show")
@click.argument("ref", metavar="REF")
@json_option
def show(ref: str, as_json: bool) -> None:
    """Show everything about one expert (NAME, NAME@VERSION or NAME@latest)."""
    record = get_registry().get_expert(ref).to_dict()
    if as_json:
        output.print_json(record)
        return
    files = record.pop("files")
    module_ranks = record.pop("module_ranks")
    ranks = sorted(set(module_ranks.values()))
    record["module_ranks"] = f"{len(module_ranks)} modules, ranks {', '.join(map(str, ranks))}"
    output.print_fields([(key.replace("_", " "), value) for key, value in record.items()])
    output.print_table(
        ["path", "sha256", "size"], [[f["path"], f["sha256"], output.human_size(f["size"])] for f in files]
    )


@main.command("verify")
@click.argument("ref", required=False, metavar="[REF]")
@json_option
def verify(ref: str | None, as_json: bool) -> None:
    """Re-hash the blobs of one expert, or of the whole catalog; exit 1 naming every bad blob."""
    report = get_registry().verify_report(ref)
    if as_json:
        output.print_json(report.to_dict())
        if not report.ok:
            raise click.exceptions.Exit(EXIT_FAILURE)
        return
    if report.ok:
        output.message(f"OK: {report.blobs} blobs of {report.experts} experts and {report.routers} routers verified")
        return
    for problem in report.problems:
        click.echo(f"Error: {one_line(str(problem))}", err=True)
    raise click.exceptions.Exit(EXIT_FAILURE)


@main.command("remove")
@click.argument("ref", metavar="REF")
@click.option("--force", is_flag=True, help="With a bare NAME, remove every version.")
def remove(ref: str, force: bool) -> None:
    """Remove an expert version (refused while a composition pins it). Blobs go at the next gc."""
    removed = get_registry().remove_expert(ref, force=force)
    output.message(f"Removed {', '.join(removed)}; its blobs are freed by atmoe-reg gc --apply")


@main.command("groups")
@click.option("--add", "add_name", metavar="NAME", help="Add a group.")
@click.option("--description", help="Description of the group to add.")
@json_option
def groups(add_name: str | None, description: str | None, as_json: bool) -> None:
    """List groups, or add one with --add NAME."""
    from atmoe.registry.groups import group_summaries

    registry = get_registry()
    if description is not None and add_name is None:
        fail("--description needs --add NAME", 2)
    if add_name is not None:
        group, created = registry.add_group(add_name, description)
        output.message(f"Added group {group.name}" if created else f"Group {group.name} already exists")
        if not as_json:
            return
    with registry.session() as session:
        rows = group_summaries(session)
    if as_json:
        output.print_json(rows)
        return
    output.print_table(["group", "experts", "description"], [[r["name"], r["experts"], r["description"]] for r in rows])


@main.command("gc")
@click.option("--apply", "apply_", is_flag=True, help="Remove them (default: only report, a dry run).")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    metavar="SECONDS",
    help="Keep anything younger than this.",
)
@json_option
def gc(apply_: bool, grace: float, as_json: bool) -> None:
    """Find unreferenced blobs and stale temp files in the store; remove them with --apply."""
    report = get_registry().gc(dry_run=not apply_, grace_seconds=grace)
    if as_json:
        output.print_json(report.to_dict())
        return
    verb = "Removed" if apply_ else "Would remove"
    summary: list[Any] = [
        f"{verb} {len(report.blobs)} unreferenced blobs ({output.human_size(report.bytes)})",
        f"{len(report.temp_files)} stale temp files",
    ]
    if report.kept_recent:
        summary.append(f"kept {report.kept_recent} younger than {grace:g}s")
    text = ", ".join(summary)
    output.message(
        text + ("" if apply_ or not (report.blobs or report.temp_files) else "; run with --apply to remove them")
    )
