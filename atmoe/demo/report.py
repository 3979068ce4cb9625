"""The demo's report: an honest verdict, report.md, and the rich table printed at the end."""

from __future__ import annotations

from pathlib import Path

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
    parts.append(f"routing accuracy {report['routing_accuracy']:.3f} "
                 f"({'meets' if routing_ok else 'misses'} the {ROUTING_TARGET} target)")
    return {"success": success, "beats": beaten, "routing_target": ROUTING_TARGET, "summary": "; ".join(parts)}


def _answers(report: dict) -> list[str]:
    """Plain answers to the paper's open questions, read off this run's numbers."""
    m = report["methods"]
    lines = []
    grouped_vs_plain = min(("uniform_mixture", "flat_router"), key=lambda k: m[k]["eval_loss"])
    lines.append(
        f"- Does grouped routing beat plain MoE on multi-intent instructions? AT-MoE eval loss "
        f"{m['atmoe']['eval_loss']:.4f} vs flat router {m['flat_router']['eval_loss']:.4f} and uniform "
        f"mixture {m['uniform_mixture']['eval_loss']:.4f}: "
        + ("yes on this suite." if m["atmoe"]["eval_loss"] < m[grouped_vs_plain]["eval_loss"] else
           "no, not on this suite.")
    )
    lines.append(
        f"- Do layer-wise routers help? per-block {m['atmoe']['eval_loss']:.4f} vs one shared router "
        f"{m['shared_router']['eval_loss']:.4f}: "
        + ("yes on this suite." if m["atmoe"]["eval_loss"] < m["shared_router"]["eval_loss"] else "no, not on this suite.")
    )
    sweep = report.get("temperature_sweep") or []
    if sweep:
        best = min(sweep, key=lambda r: r["eval_loss"])
        lines.append(
            f"- Temperature: the routers were trained at tau=1; at evaluation the lowest loss is at tau="
            f"{best['temperature']} ({best['eval_loss']:.4f}). This is a sweep, not a choice made on test."
        )
    layout = ", ".join(f"{g}: {len(v)}" for g, v in report["profile"]["suite"].items() if isinstance(v, list))
    lines.append(
        f"- How many groups and experts per group are best? Groups: one group of all experts (the flat "
        f"router, {m['flat_router']['eval_loss']:.4f}) vs the suite's three groups (AT-MoE, "
        f"{m['atmoe']['eval_loss']:.4f}). Experts per group: this run composes one layout ({layout}); "
        "other group sizes are not compared here."
    )
    return lines


def _diagnostics(report: dict) -> str:
    d = report.get("diagnostics") or {}
    lines = []
    own = d.get("expert_own_task") or {}
    if own:
        lines.append("Each expert alone on held-out data of its own single intent (does it know its skill?): "
                     + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in own.items()) + ".")
    oracle = d.get("oracle_routing_atmoe")
    if oracle:
        lines.append(f"Forced 1/k on the k intended experts of each example, every block: eval loss "
                     f"{oracle['eval_loss']:.4f}, accuracy {oracle['accuracy']:.3f}.")
    full = d.get("forced_intended_full")
    if full:
        lines.append(f"Forced weight 1 on each intended expert, every block (with the placement below this is each "
                     f"expert at full router weight in its own blocks, the best a per-block router can do): eval loss "
                     f"{full['eval_loss']:.4f}, accuracy {full['accuracy']:.3f}. When this is poor, the experts do not "
                     "compose and no router can fix that.")
    return "\n\n".join(lines) or "none"


def _placement(report: dict) -> str:
    placement = report["profile"].get("placement")
    if not placement:
        return "Every expert adapts every block (no placement)."
    where = "; ".join(f"{g}: blocks {list(v)}" for g, v in placement.items())
    return ("Each group's experts were trained with PEFT `layers_to_transform` on their own blocks only "
            f"({where}; the general expert adapts every block). This is a task-design choice made before "
            "evaluation, not learned: in each placed block only one group has LoRA deltas, so a per-block "
            "router can give that group weight ~1 there and each expert acts at full strength in its own blocks "
            "(the mixture weights sum to 1 per block). A router shared by all blocks must use one group split "
            "everywhere and cannot. Layer-wise routing is therefore favoured by design on this suite; the "
            "comparison per-block vs shared router below measures how much of that the trained routers realise. "
            f"Every expert (and the general one) was trained at lr {report['profile']['expert']['lr']}, chosen "
            "before any router was trained: at lr 1e-2 the experts also solve their own tasks, but forced to the "
            "intended experts they composed far worse (exact match 0.10 vs 0.68 on the quick suite), which "
            "changes what every mixture method can reach, not one method over another.")


def write_markdown(report: dict, path: Path) -> None:
    m = report["methods"]
    v = report["verdict"]
    rows = ["| method | held-out eval loss | exact-match accuracy |", "|---|---:|---:|"]
    for key, label in LABELS.items():
        rows.append(f"| {label} (`{key}`) | {m[key]['eval_loss']:.4f} | {m[key]['accuracy']:.3f} |")
    sweep_rows = ["| tau | eval loss | accuracy | routing accuracy |", "|---:|---:|---:|---:|"]
    for r in report["temperature_sweep"]:
        sweep_rows.append(f"| {r['temperature']} | {r['eval_loss']:.4f} | {r['accuracy']:.3f} | "
                          f"{r['routing_accuracy']:.3f} |")
    routing = report.get("routing_accuracy_by_method", {})
    best = report["method_details"].get("best_single_expert", {}).get("expert")
    timings = "\n".join(f"| {k} | {s:.1f} |" for k, s in report["timings"].items())
    text = f"""# atmoe-reg demo report ({report['profile']['name']} profile)

**Verdict: {'SUCCESS' if v['success'] else 'NOT MET'}.** {v['summary']}.

Held-out composite instructions: `work/data/test.jsonl` (sha256 `{report['data']['test']['sha256'][:16]}`);
their inputs were never seen by any expert or router.

{chr(10).join(rows)}

Best single expert: `{best}` (chosen on the validation split). General only: the general adapter alone
(lambda = 0). Uniform mixture: the AT-MoE composition with forced weights 1/E (general at 1 - lambda).

Routing accuracy (top expert of each group, weights averaged over blocks, is the intended one), held out:
AT-MoE {routing.get('atmoe', float('nan')):.3f}, flat {routing.get('flat_router', float('nan')):.3f},
shared {routing.get('shared_router', float('nan')):.3f}.

## Temperature sweep (AT-MoE routers trained at tau = 1)

{chr(10).join(sweep_rows)}

## Diagnostics (not methods)

{_diagnostics(report)}

## Task design: expert placement (disclosed)

{_placement(report)}

## The paper's open questions, on this suite

{chr(10).join(_answers(report))}

## Traceability

Compositions and routers: {', '.join(f"{k}: {r['router']}" for k, r in report['routers'].items())}.
Registry home: `{report['home']}`. Routing heatmap: `{Path(report['heatmap']).name}`.

| step | seconds |
|---|---:|
{timings}
| total | {report['total_seconds']:.1f} |
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
        table.add_row(label, f"[{style}]{loss:.4f}[/]" if style else f"{loss:.4f}", f"{m[key]['accuracy']:.3f}",
                      f"{r:.3f}" if r is not None else "")
    return table
