"""Demo step 4c: the router kinds on the AT-MoE composition, each scored by ``atmoe-reg eval`` on the held-out
test instructions and compared by ``atmoe-reg evals``.

Kinds: ``uniform`` (no data), ``arrow`` and ``arrow+gks`` (training-free, no data), ``lorahub`` (a
gradient-free search on LORAHUB_EXAMPLES router-training examples), ``trained`` (the AT-MoE routers
already trained by the routers step) and ``trained, --init prompts``. Seeded kinds run
``profile.router_seeds`` times and are reported by their mean and spread; every router is a version
of the composition in the registry, every score a stored evaluation row.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from statistics import fmean

LORAHUB_EXAMPLES = 32
LORAHUB_BUDGET = 40


def router_kinds_step(run) -> None:
    """Record every kind on demo-atmoe, then ``eval`` each router on the test split and ``evals`` them."""
    from atmoe.demo import tasks

    profile, steps, registry = run.profile, run.steps, run.registry
    composition = run.router_info["atmoe"]["composition"]
    name = composition.split("@")[0]
    test = run.files["test"]
    few = run.work / "data" / "lorahub_few.jsonl"
    lines = [json.loads(line) for line in Path(run.files["router_train"]).read_text().splitlines() if line.strip()]
    tasks.write_jsonl(few, lines[:LORAHUB_EXAMPLES])
    t = time.perf_counter()
    routers: dict[str, list[str]] = {"trained": [r["router"] for r in run.router_info["atmoe"]["routers"]]}
    steps.command("train-router", composition, "--kind", "uniform")
    routers["uniform"] = [registry.record_uniform_router(composition, notes="demo: uniform").record.ref]
    steps.command("train-router", composition, "--kind", "arrow")
    routers["arrow"] = [registry.record_arrow_router(composition, notes="demo: arrow").record.ref]
    steps.command("train-router", composition, "--kind", "arrow", "--gks")
    routers["arrow+gks"] = [registry.record_arrow_router(composition, gks=True, notes="demo: arrow+gks").record.ref]
    routers["lorahub"], routers["trained, --init prompts"] = [], []
    for offset in range(profile.router_seeds):
        seed = run.seed + offset
        steps.command("train-router", composition, "--kind", "lorahub", "--data", str(few), "--seed", str(seed))
        routers["lorahub"].append(
            registry.record_lorahub_router(
                composition, data=few, budget=LORAHUB_BUDGET, seed=seed, batch_size=32, max_length=128,
                notes=f"demo: lorahub, seed {seed}",
            ).record.ref
        )  # fmt: skip
        config = replace(run.train_config, seed=seed, init="prompts")
        steps.command("train-router", composition, "--data", str(run.files["router_train"]), "--init", "prompts",
                      "--seed", str(seed))  # fmt: skip
        routers["trained, --init prompts"].append(
            registry.train_router(
                composition, data=run.files["router_train"], config=config, notes=f"demo: prompt init, seed {seed}",
                progress=False,
            ).record.ref
        )  # fmt: skip
    steps.timed("router kinds", t)
    t = time.perf_counter()
    scores: dict[str, list[dict]] = {}
    for kind, refs in routers.items():
        for ref in refs:
            steps.command("eval", ref, "--data", str(test))
            record = registry.evaluate(ref, data=test, batch_size=32, max_length=128)
            scores.setdefault(kind, []).append({"router": ref, **record.metrics})
    steps.command("evals", name, "--data", str(test))
    steps.timed(f"eval x{sum(len(v) for v in routers.values())}", t)
    run.router_kinds = {kind: _summary(rows) for kind, rows in scores.items()}


def _summary(rows: list[dict]) -> dict:
    def stat(key: str) -> dict:
        values = [float(r[key]) for r in rows if key in r]
        if not values:
            return {}
        return {"mean": fmean(values), "spread": max(values) - min(values), "values": values}

    return {
        "runs": len(rows),
        "routers": [r["router"] for r in rows],
        "eval_loss": stat("eval_loss"),
        "exact_match": stat("exact_match"),
        "routing_accuracy": stat("routing_accuracy"),
    }


def markdown(router_kinds: dict) -> str:
    """The router-kinds table of report.md, best eval loss first, and which kind wins by how much."""
    if not router_kinds:
        return "Not run."
    order = sorted(router_kinds, key=lambda k: router_kinds[k]["eval_loss"]["mean"])
    lines = [
        "| kind | runs | eval loss (mean, spread) | exact match | routing accuracy |",
        "|---|---|---|---|---|",
    ]
    for kind in order:
        info = router_kinds[kind]
        routing = info["routing_accuracy"].get("mean")
        lines.append(
            f"| {kind} | {info['runs']} | {info['eval_loss']['mean']:.4f} ({info['eval_loss']['spread']:.4f}) | "
            f"{info['exact_match']['mean']:.3f} | {'' if routing is None else f'{routing:.3f}'} |"
        )
    best, second = order[0], order[1] if len(order) > 1 else None
    if second is not None:
        gap = router_kinds[second]["eval_loss"]["mean"] - router_kinds[best]["eval_loss"]["mean"]
        spread = max(router_kinds[k]["eval_loss"]["spread"] for k in (best, second))
        lines.append("")
        if min(router_kinds[k]["runs"] for k in (best, second)) < 2:
            lines.append(
                f"Lowest eval loss: {best}, {gap:.4f} below {second} (one run of one of them: no spread measured)."
            )
        else:
            verdict = "beyond" if gap > spread else "within"
            lines.append(
                f"Lowest eval loss: {best}, {gap:.4f} below {second} ({verdict} the larger run spread, {spread:.4f})."
            )
    return "\n".join(lines)
