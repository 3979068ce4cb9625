"""Composition commands: compose, compositions [show]."""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.options import dataclass_options, json_option, pop_config
from atmoe.config import AtmoeConfig


def _group_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@main.command("compose")
@click.option("--name", required=True, help="Composition name; a new spec under it makes a new version.")
@click.option(
    "--groups", "groups", required=True, metavar="A,B,C", help="Ordered groups, e.g. functional,domain,style."
)
@click.option(
    "--expert",
    "experts",
    multiple=True,
    metavar="REF",
    help="Narrow a group to these experts (NAME[@VERSION], repeatable); other groups take the latest of every name.",
)
@click.option("--general", metavar="REF", help="The pre-merged general expert, blended with 1 - lambda.")
@dataclass_options(AtmoeConfig)
@click.option("--description", help="What the composition is for.")
@json_option
def compose(name, groups, experts, general, description, as_json, **settings) -> None:
    """Pin experts of the listed groups as an immutable composition version."""
    config = pop_config(AtmoeConfig, settings, general=general is not None)
    registry = get_registry()
    composed, created = registry.compose(
        name=name, groups=_group_list(groups), experts=experts, general=general, config=config, description=description
    )
    record = composed.to_dict()
    if as_json:
        output.print_json({**record, "created": created})
        return
    verb = "composed" if created else "unchanged: the same spec is already"
    output.message(
        f"{verb} {record['ref']} (N_G={record['n_groups']}, N_M={record['n_max']}, {len(record['experts'])} experts)"
    )
    _print_members(record)


def _print_members(record: dict) -> None:
    rows = [(m["group"], m["slot"], m["ref"], output.short_digest(m["digest"])) for m in record["experts"]]
    if record["general"]:
        rows.append(("(general)", "", record["general"]["ref"], output.short_digest(record["general"]["digest"])))
    output.print_table(["group", "slot", "expert", "digest"], rows, title=record["ref"])


@main.group("compositions", invoke_without_command=True)
@click.option("--name", help="Only the versions of this composition.")
@json_option
@click.pass_context
def compositions(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """List composition versions (or `compositions show REF`)."""
    if ctx.invoked_subcommand is not None:
        return
    records = [c.to_dict() for c in get_registry().compositions(name=name)]
    if as_json:
        output.print_json(records)
        return
    output.print_table(
        ["ref", "groups", "N_G", "N_M", "experts", "general", "lambda", "tau", "routing", "created"],
        [
            (
                r["ref"],
                r["groups"],
                r["n_groups"],
                r["n_max"],
                len(r["experts"]),
                (r["general"] or {}).get("ref"),
                r["lambda"],
                r["temperature"],
                r["routing"],
                r["created_at"][:16] if r["created_at"] else "",
            )
            for r in records
        ],
    )


@compositions.command("remove")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove every version of a bare NAME, and aliases pointing at its routers.")
def remove(ref: str, force: bool) -> None:
    """Remove a composition version and its routers (the experts it pinned can then be removed)."""
    removed = get_registry().remove_composition(ref, force=force)
    output.message(f"Removed {', '.join(removed)} and its routers; run `atmoe-reg gc --apply` to free router blobs")


@compositions.command("show")
@click.argument("ref")
@json_option
def show(ref: str, as_json: bool) -> None:
    """One composition version: its settings and pinned experts."""
    record = get_registry().composition(ref).to_dict()
    if as_json:
        output.print_json(record)
        return
    output.print_fields(
        [
            ("ref", record["ref"]),
            ("base model", record["base_model"]),
            ("groups", record["groups"]),
            ("N_G / N_M", f"{record['n_groups']} / {record['n_max']}"),
            ("lambda", record["lambda"]),
            ("learn lambda", record["learn_lambda"]),
            ("temperature", record["temperature"]),
            ("routing", record["routing"]),
            ("options", record["options"]),
            ("spec digest", record["spec_digest"]),
            ("created", record["created_at"]),
            ("description", record["description"]),
        ]
    )
    _print_members(record)
