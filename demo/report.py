"""The demo's report: an honest verdict, report.md, and the rich table printed at the end.

(About 400 lines: one function per report section, each computing its sentences from the run.)
"""

from __future__ import annotations

from pathlib import Path

from atmoe.demo.layouts import LABELS as LAYOUT_LABELS

LABELS = {
    "base": "base model alone",
    "best_single_expert": "best single expert (PEFT)",
    "general_only": "general expert only (PEFT)",
    "uniform_mixture": "uniform mixture of all experts",
    "flat_router": "flat single-stage router",
    "shared_router": "one router shared by all blocks",
    "atmoe": "AT-MoE (grouped, per-block routers)",
}
ROUTING_TARGET = 0.9


def verdict(report: dict) -> dict:
    """Did AT-MoE beat every baseline on held-out eval loss, with routing accuracy >= 0.9?"""
    methods = report["methods"]
    ours = methods["atmoe"]["eval_loss"]
    beaten = {m: ours < v["eval_loss"] for m, v in methods.items() if m != "atmoe"}
    routing_ok = report["routing_accuracy"] >= ROUTING_TARGET
    lost_to = [m for m, won in beaten.items() if not won]
    success = not lost_to and routing_ok
    parts = []
    if lost_to:
        parts.append("AT-MoE did NOT beat " + ", ".join(lost_to) + " on held-out eval loss")
    else:
        parts.append("AT-MoE has the lowest held-out eval loss of all methods")
    parts.append(
        f"routing accuracy {report['routing_accuracy']:.3f} "
        f"({'meets' if routing_ok else 'misses'} the {ROUTING_TARGET} target)"
    )
    return {"success": success, "beats": beaten, "routing_target": ROUTING_TARGET, "summary": "; ".join(parts)}


def _compare(report: dict, ours: str, other: str) -> str:
    """ "yes", "no" or "a tie": does method ``ours`` beat method ``other`` on held-out eval loss?"""
    m, details = report["methods"], report.get("method_details", {})
    return _beats(*((m[k]["eval_loss"], details.get(k, {}).get("eval_loss_per_seed", [])) for k in (ours, other)))


def _beats(ours: tuple[float, list[float]], other: tuple[float, list[float]]) -> str:
    """ "yes", "no" or "a tie": does ``ours`` (mean eval loss, the runs behind it) beat ``other``? With
    several runs of each, a difference counts only when it exceeds the larger of the two spreads (max - min
    over runs): a gap inside the training noise is no answer either way."""
    gap = other[0] - ours[0]
    runs = [ours[1], other[1]]
    spread = max((max(r) - min(r) for r in runs if len(r) > 1), default=0.0)
    if abs(gap) <= spread:
        return f"a tie on this suite: the gap {abs(gap):.4f} is inside the spread of the router runs, {spread:.4f}"
    verdict = "yes" if gap > 0 else "no"
    note = "" if spread or not all(runs) else "; one router run per method, so a small gap is not evidence"
    return f"{verdict} on this suite, by {abs(gap):.4f}{note}"


def _answers(report: dict) -> list[str]:
    """Plain answers to the paper's open questions, read off this run's numbers."""
    m = report["methods"]
    lines = []
    lines.append(
        f"- Does grouped routing beat plain MoE on multi-intent instructions? AT-MoE eval loss "
        f"{m['atmoe']['eval_loss']:.4f} vs flat router {m['flat_router']['eval_loss']:.4f} "
        f"({_compare(report, 'atmoe', 'flat_router')}); vs the uniform mixture "
        f"{m['uniform_mixture']['eval_loss']:.4f} ({_compare(report, 'atmoe', 'uniform_mixture')})."
        + _plain_moe(report)
    )
    lines.append(
        f"- Do layer-wise routers help? per-block {m['atmoe']['eval_loss']:.4f} vs one shared router "
        f"{m['shared_router']['eval_loss']:.4f} ({_compare(report, 'atmoe', 'shared_router')})."
    )
    sweep = report.get("temperature_sweep") or []
    if sweep:
        best = min(sweep, key=lambda r: r["eval_loss"])
        lines.append(
            f"- Temperature: the routers were trained at tau=1; at evaluation the lowest loss is at tau="
            f"{best['temperature']} ({best['eval_loss']:.4f}). This is a sweep, not a choice made on test."
        )
    ceiling = (report.get("diagnostics") or {}).get("forced_intended_full")
    if ceiling:
        gaps = ", ".join(
            f"{k.replace('_router', '')} {m[k]['eval_loss'] - ceiling['eval_loss']:+.4f}"
            for k in ("atmoe", "flat_router", "shared_router")
        )
        lines.append(
            f"- What limits the routers here? The intended experts forced at full weight (no router; see "
            f"Diagnostics) reach eval loss {ceiling['eval_loss']:.4f}; each router method's distance to that: {gaps}. "
            "Where all are close to it, the routers already do what these experts allow, and the comparison "
            "between router designs is decided by how well the experts compose, not by the routers."
        )
    lines.append(_layout_answer(report))
    return lines


def _plain_moe(report: dict) -> str:
    """AT-MoE against the plain MoEs of the group layouts (one softmax over all experts, no groups)."""
    layouts = report.get("group_layouts") or {}
    if "one_group" not in layouts or "solo_groups" not in layouts:
        return ""
    ours = layouts["intent_groups"]
    answers = {
        k: _beats(
            (ours["eval_loss"], ours["eval_loss_per_seed"]), (layouts[k]["eval_loss"], layouts[k]["eval_loss_per_seed"])
        )
        for k in ("one_group", "solo_groups")
    }
    text = (
        " The flat router of the table is one softmax over all experts, but its routing loss is still told "
        "which expert of each group is intended (the ratio of each intended expert's weight to its group's). "
        "A plain MoE that knows no groups is one group of all experts (see 'Group layouts'): with the intents "
        f"supervising its one softmax, {layouts['one_group']['eval_loss']:.4f} (does AT-MoE beat it? "
        f"{answers['one_group']}); trained by the language-model loss alone (one expert per group), "
        f"{layouts['solo_groups']['eval_loss']:.4f} ({answers['solo_groups']})."
    )
    flat = _compare(report, "atmoe", "flat_router")
    if all(a.startswith("yes") for a in answers.values()) and not flat.startswith("yes"):
        text += (
            " So on this suite what grouping buys is the groups' structure in what the router is taught, "
            "not the router's two stages: a flat softmax given the same groups in its loss does "
            + ("as well." if flat.startswith("a tie") else "better.")
        )
    return text


def _layout_answer(report: dict) -> str:
    layouts = report.get("group_layouts") or {}
    question = "- How many groups and experts per group are best?"
    if not layouts:
        return (
            f"{question} Not measured in this run: the default profile (not --quick) routes the same "
            "experts in four group layouts (one group of all, the suite's groups, the suite's group sizes "
            "with kinds mixed, one expert per group) and answers this."
        )
    ours = layouts["intent_groups"]
    parts = []
    for name, info in layouts.items():
        if name != "intent_groups":
            answer = _beats(
                (ours["eval_loss"], ours["eval_loss_per_seed"]), (info["eval_loss"], info["eval_loss_per_seed"])
            )
            parts.append(
                f"{_shape(info)} {LAYOUT_LABELS[name]} {info['eval_loss']:.4f} "
                f"(do the suite's groups beat it? {answer})"
            )
    best = min(layouts, key=lambda k: layouts[k]["eval_loss"])
    return (
        f"{question} With these {sum(len(v) for v in ours['groups'].values())} experts: the suite's own "
        f"groups ({_shape(ours)}, one per intent kind) {ours['eval_loss']:.4f} vs "
        + "; ".join(parts)
        + f". Lowest mean: {LAYOUT_LABELS[best]}. See 'Group layouts' for what each layout lets the "
        "intents teach."
    )


def _shape(info: dict) -> str:
    return f"{info['n_groups']} x {info['n_max']}"


def _layouts(report: dict) -> str:
    """The group-layout comparison: the same experts, grouped in other ways, each routed by AT-MoE."""
    layouts = report.get("group_layouts") or {}
    if not layouts:
        return "Not run in this profile (the default profile runs it)."
    rows = [
        "| layout | N_G x N_M | groups | eval loss (mean) | eval loss per run | exact match | routing accuracy |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for name, info in layouts.items():
        groups = "; ".join(f"{g}: {', '.join(v)}" for g, v in info["groups"].items())
        runs = ", ".join(f"{x:.4f}" for x in info["eval_loss_per_seed"])
        rows.append(
            f"| {LAYOUT_LABELS[name]} (`{name}`) | {_shape(info)} | {groups} | {info['eval_loss']:.4f} | "
            f"{runs} | {info['accuracy']:.3f} | {info['routing_accuracy']:.3f} |"
        )
    return (
        "The same trained experts (and the same general expert, lambda start, placement and router recipe), "
        "partitioned into groups in four ways, each routed by per-block grouped routers and trained "
        f"{len(next(iter(layouts.values()))['eval_loss_per_seed'])} time(s). Other layouts register the same "
        "adapters again under their own names and groups (the same blobs). The routing loss can only say "
        "which expert inside a group is intended, so the layout decides what the intents teach: with the "
        "suite's groups each group holds one intended expert; with one group of all experts (a plain MoE) "
        "the three intended experts share one softmax and the loss pulls each towards 1/3 in every block, "
        "although each block's deltas belong to one group's experts; with kinds mixed, some groups hold two "
        "or three intended experts; with one expert per group there is nothing to choose inside a group, so "
        "the intents teach nothing and the router learns from the language-model loss alone. Routing "
        "accuracy is scored with the suite's groups for every layout (the top expert among each intended "
        "expert's functional / domain / style peers, weights averaged over blocks).\n\n" + "\n".join(rows)
    )


def _diagnostics(report: dict) -> str:
    d = report.get("diagnostics") or {}
    lines = []
    own = d.get("expert_own_task") or {}
    if own:
        lines.append(
            "Each expert alone on held-out data of its own single intent (does it know its skill?): "
            + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in own.items())
            + "."
        )
    oracle = d.get("oracle_routing_atmoe")
    if oracle:
        lines.append(
            f"Forced 1/k on the k intended experts of each example, every block: eval loss "
            f"{oracle['eval_loss']:.4f}, accuracy {oracle['accuracy']:.3f}."
        )
    full = d.get("forced_intended_full")
    if full:
        lines.append(
            f"Forced weight 1 on each intended expert, every block (with the placement below this is each "
            f"expert at full router weight in its own blocks, the best a per-block router can do): eval loss "
            f"{full['eval_loss']:.4f}, accuracy {full['accuracy']:.3f}. When this is poor, the experts do not "
            "compose and no router can fix that."
        )
    return "\n\n".join(lines) or "none"


def _placement(report: dict) -> str:
    placement = report["profile"].get("placement")
    if not placement:
        return "Every expert adapts every block (no placement)."
    where = "; ".join(f"{g}: blocks {list(v)}" for g, v in placement.items())
    return (
        "Each group's experts were trained with PEFT `layers_to_transform` on their own blocks only "
        f"({where}; the general expert adapts every block). This is a task-design choice made before "
        "evaluation, not learned: in each placed block only one group has LoRA deltas, so a per-block "
        "router can give that group weight ~1 there and each expert acts at full strength in its own blocks "
        "(the mixture weights sum to 1 per block). A router shared by all blocks shares its weights, not its "
        "input: each block's pooled hidden state, standardised per block, differs, so the shared router can "
        "still give each block its own group split; the comparison per-block vs shared router below measures "
        "whether separate weights per block help beyond that. "
        f"Every expert (and the general one) was trained at lr {report['profile']['expert']['lr']}, chosen "
        "before any router was trained, on how well the experts compose when forced to the intended ones "
        "(a higher rate also solves each expert's own task but composes worse); that choice changes what "
        "every mixture method can reach, not one method over another. The measurements behind it are in "
        "docs/DEMO_NOTES.md."
    )


def _router_runs(report: dict) -> str:
    """Each router method's runs (one per router seed): the spread behind the means in the table."""
    details = report["method_details"]
    methods = [m for m in ("flat_router", "shared_router", "atmoe") if "eval_loss_per_seed" in details.get(m, {})]
    if not methods:
        return ""
    seeds = [r["seed"] for r in report["routers"]["atmoe"]["routers"]]
    if len(seeds) == 1:
        return (
            "Every router method was trained once (router seed "
            f"{seeds[0]}): one draw of the routers' training noise. The default profile trains each three "
            "times and reports the spread of the runs (docs/DEMO_NOTES.md records the spreads seen so far); "
            "differences between router methods smaller than that spread are not evidence either way."
        )
    rows = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for m in methods:
        losses = details[m]["eval_loss_per_seed"]
        rows.append(
            f"| {LABELS[m]} | "
            + " | ".join(f"{x:.4f}" for x in losses)
            + f" | {report['methods'][m]['eval_loss']:.4f} |"
        )
    wins = sum(
        all(a < details[m]["eval_loss_per_seed"][i] for m in methods if m != "atmoe")
        for i, a in enumerate(details["atmoe"]["eval_loss_per_seed"])
    )
    return (
        f"Every router method was trained {len(seeds)} time(s), one run per router seed (every run is a router "
        "version in the registry); the table above reports the mean. Held-out eval loss per run:\n\n"
        + "\n".join(rows)
        + f"\n\nAT-MoE has the lowest loss of the router methods in {wins} of {len(seeds)} runs."
    )


def _choices(report: dict) -> str:
    """The settings chosen before the test set was read, and on what."""
    p = report["profile"]
    return (
        f"Every router method used the same recipe: lambda (the routed experts' share) started at {p['lam']}"
        f"{' and learned per block' if p['learn_lambda'] else ''}, {p['router_epochs']} epochs, AdamW lr "
        f"{p['router_lr']} with a cosine decay, routing-loss weight {p['routing_loss_weight']}. The lambda start "
        "and the learning rate were chosen on the validation split (router_eval, never test) for all router "
        "methods alike, before this run; the validation measurements behind them are in docs/DEMO_NOTES.md."
    )


def _router_kinds(report: dict) -> str:
    from atmoe.demo.router_kinds import markdown

    return markdown(report.get("router_kinds") or {})


def write_markdown(report: dict, path: Path) -> None:
    m = report["methods"]
    v = report["verdict"]
    rows = ["| method | held-out eval loss | exact-match accuracy |", "|---|---:|---:|"]
    for key, label in LABELS.items():
        rows.append(f"| {label} (`{key}`) | {m[key]['eval_loss']:.4f} | {m[key]['accuracy']:.3f} |")
    sweep_rows = ["| tau | eval loss | accuracy | routing accuracy |", "|---:|---:|---:|---:|"]
    for r in report["temperature_sweep"]:
        sweep_rows.append(
            f"| {r['temperature']} | {r['eval_loss']:.4f} | {r['accuracy']:.3f} | {r['routing_accuracy']:.3f} |"
        )
    routing = report.get("routing_accuracy_by_method", {})
    best = report["method_details"].get("best_single_expert", {}).get("expert")
    timings = "\n".join(f"| {k} | {s:.1f} |" for k, s in report["timings"].items())
    text = f"""# atmoe-reg demo report ({report["profile"]["name"]} profile)

**Verdict: {"SUCCESS" if v["success"] else "NOT MET"}.** {v["summary"]}.

Held-out composite instructions: `work/data/test.jsonl` (sha256 `{report["data"]["test"]["sha256"][:16]}`);
their inputs were never seen by any expert or router.

{chr(10).join(rows)}

Best single expert: `{best}` (chosen on the validation split). General only: the general adapter alone
(lambda = 0). Uniform mixture: the AT-MoE composition with forced weights 1/E (general at 1 - lambda).

Routing accuracy (top expert of each group, weights averaged over blocks, is the intended one), held out:
AT-MoE {routing.get("atmoe", float("nan")):.3f}, flat {routing.get("flat_router", float("nan")):.3f},
shared {routing.get("shared_router", float("nan")):.3f}.

{_router_runs(report)}

## Router kinds on the AT-MoE composition (`atmoe-reg eval` on the test split, compared by `atmoe-reg evals`)

{_router_kinds(report)}

## Temperature sweep (the first AT-MoE router run, trained at tau = 1)

{chr(10).join(sweep_rows)}

## Diagnostics (not methods)

{_diagnostics(report)}

## Task design: expert placement (disclosed)

{_placement(report)}

## Settings chosen on the validation split

{_choices(report)}

## Group layouts: how many groups, how many experts per group

{_layouts(report)}

## The paper's open questions, on this suite

{chr(10).join(_answers(report))}

## Traceability

Compositions and routers: {"; ".join(k + ": " + ", ".join(x["router"] for x in r["routers"]) for k, r in report["routers"].items())}.
Registry home: `{report["home"]}`. Routing heatmap: `{Path(report["heatmap"]).name}`.

| step | seconds |
|---|---:|
{timings}
| total | {report["total_seconds"]:.1f} |
"""
    Path(path).write_text(text)


def rich_table(report: dict):
    from rich.table import Table

    m = report["methods"]
    best_loss = min(v["eval_loss"] for v in m.values())
    table = Table(title=f"held-out composite instructions ({report['profile']['name']} profile)")
    table.add_column("method")
    table.add_column("eval loss", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("routing acc.", justify="right")
    routing = report.get("routing_accuracy_by_method", {})
    for key, label in LABELS.items():
        loss = m[key]["eval_loss"]
        style = "bold green" if loss == best_loss else ""
        r = routing.get(key)
        table.add_row(
            label,
            f"[{style}]{loss:.4f}[/]" if style else f"{loss:.4f}",
            f"{m[key]['accuracy']:.3f}",
            f"{r:.3f}" if r is not None else "",
        )
    return table


def layout_table(report: dict):
    """The group-layout comparison as a rich table; None when this run compared no layouts."""
    from rich.table import Table

    layouts = report.get("group_layouts") or {}
    if not layouts:
        return None
    best_loss = min(v["eval_loss"] for v in layouts.values())
    table = Table(title="group layouts: the same experts grouped otherwise, per-block grouped routers")
    for column in ("layout", "N_G x N_M", "eval loss", "accuracy", "routing acc."):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for name, info in layouts.items():
        loss = f"{info['eval_loss']:.4f}"
        table.add_row(
            LAYOUT_LABELS[name],
            _shape(info),
            f"[bold green]{loss}[/]" if info["eval_loss"] == best_loss else loss,
            f"{info['accuracy']:.3f}",
            f"{info['routing_accuracy']:.3f}",
        )
    return table
