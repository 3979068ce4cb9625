"""Evaluation commands: eval (score a router on a data file, store the row), evals (compare a composition's
routers on the same data). torch is imported only inside ``eval``."""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.options import json_option


@main.command("eval")
@click.argument("ref", metavar="NAME[@VERSION][:ROUTER]")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Evaluation JSONL (as train-router's).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per example, at most.")
@click.option("--max-new-tokens", type=int, help="Greedy answer length (default: longest response + 2).")
@click.option("--base-model", help="Load the base model from here instead of the catalog's reference.")
@json_option
def eval_command(ref, data, batch_size, max_length, max_new_tokens, base_model, as_json) -> None:
    """Score a router (default: the newest) on DATA and store the result: response loss, exact match of
    greedy answers, routing accuracy where the examples name intents."""
    record = get_registry().evaluate(
        ref, data=data, batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
        base_model=base_model,
    ).to_dict()  # fmt: skip
    if as_json:
        output.print_json(record)
        return
    metrics = record["metrics"]
    shown = {k: metrics[k] for k in ("eval_loss", "exact_match", "routing_accuracy") if k in metrics}
    output.message(
        f"evaluated {record['kind']} router {record['router']} on {record['examples']} examples "
        f"(data sha256:{output.short_digest(record['data_digest'])}): "
        + ", ".join(f"{k}={v:.4f}" for k, v in shown.items())
    )


@main.command("evals")
@click.argument("name")
@click.option(
    "--data", "data_file", type=click.Path(dir_okay=False, exists=True), help="Only evaluations on this file."
)
@click.option("--data-digest", help="Only evaluations on the data of this sha256 (or a prefix of 8+ hex digits).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart PNG (one data file: name it).")
@json_option
def evals(name, data_file, data_digest, plot, as_json) -> None:
    """Compare the stored evaluations of every router of composition NAME, per data file (newest per router)."""
    from atmoe.errors import UsageError
    from atmoe.registry.evaluations import comparison

    if data_file and data_digest:
        raise UsageError("give --data or --data-digest, not both")
    if data_file:
        from atmoe.data import data_digest as digest_of

        data_digest = digest_of(data_file)
    rows = comparison(get_registry().evaluations(name, data_digest=data_digest))
    if plot:
        digests = {r["data_digest"] for r in rows}
        if len(digests) != 1:
            raise UsageError(
                f"--plot draws one data file, and {len(digests)} have evaluations of {name}: add --data or --data-digest"
            )
        from atmoe.report import evaluations_png

        evaluations_png(rows, plot, title=f"{name} on data sha256:{output.short_digest(rows[0]['data_digest'])}")
    if as_json:
        output.print_json(rows)
        return
    if not rows:
        output.message(f"no evaluations of {name}: run atmoe-reg eval {name}[:ROUTER] --data FILE")
        return
    output.print_table(
        ["data", "router", "kind", "examples", "eval loss", "exact match", "routing acc", "evaluated"],
        [
            (
                output.short_digest(r["data_digest"]),
                r["router"],
                r["kind"],
                r["examples"],
                output.metric(r["metrics"].get("eval_loss")),
                output.metric(r["metrics"].get("exact_match")),
                output.metric(r["metrics"].get("routing_accuracy")),
                r["created_at"][:16] if r["created_at"] else "",
            )
            for r in rows
        ],
    )
