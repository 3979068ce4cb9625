"""``atmoe-reg demo``: the end-to-end AT-MoE demo on the built-in multi-intent task suite."""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import main


@main.command("demo")
@click.option("--quick", is_flag=True, help="The small profile (about 5 minutes on 2 CPU cores).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="atmoe-demo",
    show_default=True,
    help="Where report.json, report.md, the heatmap and the work files go.",
)
@click.option(
    "--home",
    "demo_home",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Registry home for the demo (default: the global --home if given, else a new temporary one).",
)
@click.option(
    "--base-model",
    metavar="REF",
    help="Use this base model (a folder, a .gguf, smollm2-135m-instruct) instead of building a tiny one.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print report.json alone on stdout.")
@click.pass_context
def demo(
    ctx: click.Context,
    quick: bool,
    out_dir: str,
    demo_home: str | None,
    base_model: str | None,
    seed: int,
    as_json: bool,
) -> None:
    """Build a base model and experts, register, compose, train routers, evaluate, report.

    Downloads nothing. Compares AT-MoE with base, best single expert, general only, uniform mixture,
    flat router and shared router on held-out composite instructions; the default profile also routes
    the same experts in other group layouts (one group, mixed kinds, one expert per group).
    """
    from pathlib import Path

    from atmoe.cli.app import _state
    from atmoe.demo.pipeline import run_demo
    from atmoe.demo.report import layout_table, rich_table

    home = demo_home or _state(ctx).home
    report = run_demo(Path(out_dir), quick=quick, home=Path(home) if home else None, base_model=base_model, seed=seed)
    if as_json:
        output.print_json(report)
        return
    output.stdout_console().print(rich_table(report))
    layouts = layout_table(report)
    if layouts is not None:
        output.stdout_console().print(layouts)
    verdict = report["verdict"]
    output.message(("verdict: " if verdict["success"] else "verdict (goal NOT met): ") + verdict["summary"])
    output.message(
        f"wrote {Path(out_dir) / 'report.json'}, report.md, routing_heatmap.png in {report['total_seconds']:.0f} s"
    )
