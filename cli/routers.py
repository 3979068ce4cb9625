"""Router commands: train-router, routers, alias, route, generate, export-lora.

torch is imported only inside the commands that build a model.
"""

from __future__ import annotations

import math
from typing import Any

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.options import dataclass_options, json_option, pop_config
from atmoe.config import TrainConfig
from atmoe.errors import UsageError

force_option = click.option(
    "--force",
    "force",
    multiple=True,
    metavar="NAME=W",
    help="Force an expert's weight (repeatable); unnamed experts get 0.",
)
router_option = click.option(
    "--router", "router", metavar="N|ALIAS", help="Router number or alias (default: the newest)."
)
base_option = click.option("--base-model", help="Load the base model from here instead of the catalog's reference.")


def parse_force(values: tuple[str, ...]) -> dict[str, float] | None:
    """``NAME=W`` pairs into weights; malformed, negative or non-finite values are usage errors."""
    if not values:
        return None
    weights: dict[str, float] = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise UsageError(f"--force {text!r}: expected NAME=WEIGHT, e.g. --force diagnosis=1.0")
        try:
            weight = float(value)
        except ValueError:
            raise UsageError(f"--force {text!r}: {value!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--force {text!r}: weights must be finite and >= 0")
        if name in weights:
            raise UsageError(f"--force names {name!r} twice")
        weights[name] = weight
    return weights


def _with_router(ref: str, router: str | None) -> str:
    if router is None:
        return ref
    if ":" in ref:
        raise UsageError(f"{ref!r} already names a router: drop --router or the ':ROUTER' part")
    return f"{ref}:{router}"


ROUTER_KINDS = ("trained", "uniform", "arrow", "lorahub")


@main.command("train-router")
@click.argument("ref")
@click.option(
    "--kind",
    type=click.Choice(ROUTER_KINDS),
    default="trained",
    show_default=True,
    help="trained: learn the routers on --data; uniform: equal weights inside each group and over groups, no data; "
    "arrow: training-free, each input to the top-k experts by cosine with their prototypes, no data; "
    "lorahub: static weights searched without gradients on 5-50 --data examples.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help="Training JSONL (prompt/response or messages, optional intents); --kind trained needs it.",
)
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False), help="Evaluation JSONL.")
@dataclass_options(TrainConfig)
@click.option("--top-k", "top_k", type=int, help="arrow: experts per group an input goes to (default 3).")
@click.option("--arrow-temperature", type=float, help="arrow: softmax temperature of the cosines (default 1).")
@click.option("--gks", is_flag=True, help="arrow: subtract the general expert's update first (GenKnowSub).")
@click.option("--budget", type=int, help="lorahub: loss evaluations of the search (default 40).")
@click.option("--l1", type=float, help="lorahub: L1 penalty on the weights' logits (default 0.05).")
@click.option("--alias", help="Point this alias (e.g. prod) at the new router.")
@click.option("--notes", help="Free text recorded with the router.")
@base_option
@json_option
def train_router(
    ref,
    kind,
    data,
    eval_data,
    top_k,
    arrow_temperature,
    gks,
    budget,
    l1,
    alias,
    notes,
    base_model,
    as_json,
    **hyperparameters,
) -> None:
    """Train the routers of a composition (experts frozen) and record them as its next router."""
    config = pop_config(TrainConfig, hyperparameters)
    registry = get_registry()
    if kind != "lorahub" and (budget is not None or l1 is not None):
        raise UsageError("--budget and --l1 are options of --kind lorahub")
    if kind != "arrow" and (top_k is not None or arrow_temperature is not None or gks):
        raise UsageError("--top-k, --arrow-temperature and --gks are options of --kind arrow")
    if kind == "arrow":
        if data is not None:
            raise UsageError("--kind arrow takes no --data (it is training-free); --eval scores it")
        trained = registry.record_arrow_router(
            ref, top_k=3 if top_k is None else top_k, temperature=1.0 if arrow_temperature is None else arrow_temperature,
            gks=gks, eval_data=eval_data, alias=alias, notes=notes, base_model=base_model,
            batch_size=config.batch_size, max_length=config.max_length,
        )  # fmt: skip
    elif kind == "lorahub":
        if data is None:
            raise UsageError("--kind lorahub needs --data FILE (5 to 50 examples)")
        trained = registry.record_lorahub_router(
            ref, data=data, eval_data=eval_data, budget=40 if budget is None else budget,
            l1=0.05 if l1 is None else l1, seed=config.seed, alias=alias, notes=notes, base_model=base_model,
            batch_size=config.batch_size, max_length=config.max_length,
        )  # fmt: skip
    elif kind == "uniform":
        if data is not None:
            raise UsageError("--kind uniform takes no --data (it learns nothing); --eval scores it")
        trained = registry.record_uniform_router(
            ref, eval_data=eval_data, alias=alias, notes=notes, base_model=base_model,
            batch_size=config.batch_size, max_length=config.max_length,
        )  # fmt: skip
    else:
        if data is None:
            raise UsageError("--kind trained needs --data FILE (training JSONL)")
        trained = registry.train_router(
            ref,
            data=data,
            eval_data=eval_data,
            config=config,
            alias=alias,
            notes=notes,
            progress=True,
            console=output.console(),
            base_model=base_model,
        )
    record = trained.record.to_dict()
    if as_json:
        output.print_json(record)
        return
    metrics = record["metrics"]
    shown = {k: metrics[k] for k in ("train_loss", "eval_loss_before", "eval_loss", "routing_accuracy") if k in metrics}
    output.message(
        f"recorded {record['kind']} router {record['ref']}"
        + (f" (alias {alias})" if alias else "")
        + (f"; data sha256:{output.short_digest(record['data_digest'])}" if record["data_digest"] else "")
        + "; "
        + ", ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None)
    )


@main.command("routers")
@click.argument("ref")
@json_option
def routers(ref: str, as_json: bool) -> None:
    """The routers of a composition version, with their lineage and metrics."""
    records = [r.to_dict() for r in get_registry().routers(ref)]
    if as_json:
        output.print_json(records)
        return
    output.print_table(
        ["ref", "kind", "aliases", "data", "eval loss", "routing acc", "epochs", "lr", "seed", "created"],
        [
            (
                r["ref"],
                r["kind"],
                r["aliases"],
                output.short_digest(r["data_digest"]),
                output.metric(r["metrics"].get("eval_loss")),
                output.metric(r["metrics"].get("routing_accuracy")),
                r["hyperparameters"].get("epochs"),
                r["hyperparameters"].get("lr"),
                r["hyperparameters"].get("seed"),
                r["created_at"][:16] if r["created_at"] else "",
            )
            for r in records
        ],
    )


@main.command("alias")
@click.argument("router_ref", metavar="NAME[@VERSION]:ROUTER")
@click.argument("alias")
def alias(router_ref: str, alias: str) -> None:
    """Point ALIAS (e.g. prod) at a router; an existing alias moves."""
    record = get_registry().set_alias(router_ref, alias)
    output.message(f"{alias} -> {record.ref}")


def _routing_out(
    document: dict, expert_groups: dict[str, str], as_json: bool, plot: str | None, label: str, prompt: str
) -> None:
    from atmoe.report import heatmap_png, routing_table

    blocks = [{"groups": b["groups"], "experts": b["experts"]} for b in document["blocks"]]
    if plot:
        heatmap_png({prompt: blocks}, plot, title=label)
    if as_json:
        output.print_json(document)
        return
    from rich.text import Text

    title = Text(output.plain(f"{label}: {prompt}"))  # the prompt is text, not markup
    output.stdout_console().print(routing_table(blocks, expert_groups, title=title))
    summary = document["summary"]
    top = max(summary["experts"], key=summary["experts"].get)
    output.message(
        f"mean over {len(blocks)} blocks: top group {max(summary['groups'], key=summary['groups'].get)}, "
        f"top expert {top}" + (f"; plot written to {plot}" if plot else "")
    )


@main.command("route")
@click.argument("ref")
@click.argument("prompt")
@router_option
@force_option
@base_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a routing heatmap PNG here.")
@json_option
def route(ref, prompt, router, force, base_model, plot, as_json) -> None:
    """Show, block by block, the groups and experts the routers choose for PROMPT."""
    from atmoe.inspect import route_prompt

    weights = parse_force(force)
    registry = get_registry()
    registry.check_force(ref, weights)
    built = registry.build(_with_router(ref, router), base_model=base_model)
    document = route_prompt(built.model, built.tokenizer, prompt, force=weights)
    document["lineage"] = built.lineage()
    label = "forced" if weights else (built.router or f"{built.composition} (untrained router)")
    _routing_out(document, built.model.expert_groups, as_json, plot, label, prompt)


@main.command("generate")
@click.argument("ref")
@click.argument("prompt")
@router_option
@force_option
@base_option
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@json_option
def generate(ref, prompt, router, force, base_model, max_new_tokens, as_json) -> None:
    """Answer PROMPT (greedy, streamed), then show the routing summary and lineage."""
    import sys

    from atmoe.inspect import generate_text
    from atmoe.report import top_expert_per_group

    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    weights = parse_force(force)
    registry = get_registry()
    registry.check_force(ref, weights)
    built = registry.build(_with_router(ref, router), base_model=base_model)

    def stream(text: str) -> None:  # the model's text is data: control characters shown, not sent
        sys.stdout.write(output.plain(text))
        sys.stdout.flush()

    answer, document = generate_text(
        built.model,
        built.tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        force=weights,
        on_text=None if as_json else stream,
    )
    if as_json:
        output.print_json({"answer": answer, "routing": document, "lineage": built.lineage()})
        return
    sys.stdout.write("\n")
    summary = document["summary"]
    tops = top_expert_per_group(summary["experts"], built.model.expert_groups)
    groups = ", ".join(f"{g} {summary['groups'][g]:.2f} -> {tops[g]}" for g in summary["groups"])
    output.message(
        f"routing (mean over blocks): {groups}; by {built.router or built.composition + ' (untrained router)'}"
    )


@main.command("export-lora")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(file_okay=False))
@router_option
@force_option
@click.option("--prompt", help="Export the per-block plan the router chooses for this prompt.")
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    help="Cap every module at this rank (truncated SVD of the merged update; vLLM's default max is 16). "
    "Without it the export is exact.",
)
@click.option(
    "--merge",
    type=click.Choice(("ties", "dare_linear", "svd")),
    help="A static merge of the plan's experts through PEFT's add_weighted_adapter (a baseline), "
    "refused where PEFT is not exact for them; --rank is then svd's rank.",
)
@click.option(
    "--density", type=float, default=0.5, show_default=True, help="ties / dare_linear: share of entries kept."
)
@base_option
def export_lora(ref, out_dir, router, force, prompt, rank, merge, density, base_model) -> None:
    """Write a routing plan (forced weights, or the router's choice for --prompt) as one plain PEFT LoRA."""
    from functools import partial

    from atmoe.export import export_plan
    from atmoe.inspect import route_prompt

    write_plan = partial(export_plan, rank=rank)
    if merge is not None:
        write_plan = partial(_merged_plan, ref=_with_router(ref, router), method=merge, density=density, rank=rank)

    weights = parse_force(force)
    if (weights is None) == (prompt is None):
        raise UsageError("give either --force NAME=W ... or --prompt TEXT")
    registry = get_registry()
    registry.check_force(ref, weights)
    built = registry.build(_with_router(ref, router), base_model=base_model)
    if weights is not None:
        with built.model.forced_routing(weights):
            route_prompt(built.model, built.tokenizer, prompt or "plan", force=None)
            plan: Any = write_plan(built.model, out_dir, base_model_name_or_path=built.base_model)
    else:
        route_prompt(built.model, built.tokenizer, prompt)
        plan = write_plan(built.model, out_dir, base_model_name_or_path=built.base_model)
    if merge is not None:
        shown = ", ".join(f"{name} {weight:.3f}" for name, weight in plan.weights.items())
        output.message(
            f"wrote the {merge} merge (rank {plan.rank}) of {built.router or built.composition} to {plan.path}: {shown}"
            + (
                f"; max relative error against the exact rank-{plan.rank} sum {max(plan.errors.values()):.3g}"
                if plan.errors
                else ""
            )
        )
        return
    output.message(f"wrote a plain PEFT LoRA adapter to {plan.path} (from {built.router or built.composition})")
    if rank is not None:
        worst = max(plan.errors, key=lambda module: plan.errors[module]) if plan.errors else None
        output.message(
            f"rank {rank}: max relative error {plan.max_error:.3g}"
            + (f" ({worst})" if worst and plan.max_error > 0 else " (exact)")
            + f" over {len(plan.errors)} modules; per module: "
            + ", ".join(f"{module} {error:.3g}" for module, error in sorted(plan.errors.items()) if error > 0)
        )


def _merged_plan(model, out_dir, *, base_model_name_or_path, ref, method, density, rank):
    """``export-lora --merge``: the plan's weights, merged by PEFT from the verified expert folders."""
    from atmoe.loading import load_base_model
    from atmoe.merge import merge_adapters, plan_weights

    weights = plan_weights(model)
    registry = get_registry()
    with registry.expert_folders(ref) as folders:
        base, _ = load_base_model(base_model_name_or_path)
        return merge_adapters(base, folders, weights, out_dir, method=method, density=density, rank=rank)
