"""Routing reports: per-block weights as data, a summary over blocks, rich tables and a heatmap PNG.

A routing is what ``AtMoEModel.last_routing()`` returns: one ``{"groups": {g: w}, "experts": {e: w}}``
per routed block. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from atmoe.errors import AtmoeError

Routing = Sequence[Mapping[str, Mapping[str, float]]]


def summarize(blocks: Routing) -> dict:
    """Weights averaged over blocks: ``{"groups": {...}, "experts": {...}}`` in the blocks' order."""
    summary: dict[str, dict[str, float]] = {"groups": {}, "experts": {}}
    if not blocks:
        return summary
    for key in ("groups", "experts"):
        for name in blocks[0][key]:
            summary[key][name] = sum(float(block[key][name]) for block in blocks) / len(blocks)
    return summary


def top_expert_per_group(experts: Mapping[str, float], expert_groups: Mapping[str, str]) -> dict[str, str]:
    """For each group, the expert with the largest weight (ties go to the first in order)."""
    best: dict[str, tuple[str, float]] = {}
    for name, weight in experts.items():
        group = expert_groups[name]
        if group not in best or weight > best[group][1]:
            best[group] = (name, weight)
    return {group: name for group, (name, _) in best.items()}


def routing_document(blocks: Routing, *, block_names: Sequence[str] | None = None) -> dict:
    """The ``--json`` shape of ``atmoe-reg route``: blocks, then the summary over blocks."""
    names = list(block_names) if block_names is not None else [str(i) for i in range(len(blocks))]
    return {
        "blocks": [
            {"block": name, "groups": dict(block["groups"]), "experts": dict(block["experts"])}
            for name, block in zip(names, blocks)
        ],
        "summary": summarize(blocks),
    }


def routing_table(blocks: Routing, expert_groups: Mapping[str, str], *, title: Any = "routing"):
    """A rich table: one row per block, one column per expert (grouped), shaded by weight."""
    from rich.table import Table

    experts = list(blocks[0]["experts"]) if blocks else []
    groups = list(blocks[0]["groups"]) if blocks else []
    table = Table(title=title, show_lines=False)
    table.add_column("block", justify="right")
    for group in groups:
        table.add_column(f"{group}\n(group)", justify="right", style="bold")
        for expert in experts:
            if expert_groups[expert] == group:
                table.add_column(expert, justify="right")
    rows = [(str(i), block) for i, block in enumerate(blocks)]
    rows.append(("mean", summarize(blocks)))
    for label, block in rows:
        cells = [label]
        for group in groups:
            cells.append(_shade(block["groups"][group]))
            cells.extend(_shade(block["experts"][e]) for e in experts if expert_groups[e] == group)
        table.add_row(*cells, end_section=label == str(len(blocks) - 1))
    return table


def _shade(weight: float) -> str:
    level = min(max(weight, 0.0), 1.0)
    style = "bold green" if level >= 0.5 else "green" if level >= 0.2 else "dim"
    return f"[{style}]{weight:.3f}[/]"


def heatmap_png(routings: Mapping[str, Routing], path: str, *, title: str = "AT-MoE routing") -> str:
    """Write a heatmap (blocks x experts, one panel per query) to ``path``; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AtmoeError("--plot needs matplotlib: pip install 'atmoe-registry[plot]'") from None
    queries = list(routings)
    if not queries:
        raise AtmoeError("nothing to plot")
    experts = list(routings[queries[0]][0]["experts"])
    n_blocks = max(len(routings[q]) for q in queries)
    fig, axes = plt.subplots(
        len(queries), 1, figsize=(1.0 + 0.75 * len(experts), 1.2 + 0.4 * n_blocks * len(queries)), squeeze=False
    )
    for axis, query in zip(axes[:, 0], queries):
        matrix = [[float(block["experts"][e]) for e in experts] for block in routings[query]]
        image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(matrix)), [f"block {i}" for i in range(len(matrix))], fontsize=7)
        axis.set_title(query if len(query) <= 70 else query[:67] + "...", fontsize=8)
        for row, values in enumerate(matrix):
            for col, value in enumerate(values):
                axis.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > 0.6 else "white",
                )
        fig.colorbar(image, ax=axis, fraction=0.03)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluations_png(rows: Sequence[Mapping], path: str, *, title: str = "Routers compared") -> str:
    """A bar chart of eval loss and exact match per router (``evals --plot``), one panel per metric; needs
    matplotlib. ``rows``: ``evals --json`` rows of one data file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AtmoeError("--plot needs matplotlib: pip install 'atmoe-registry[plot]'") from None
    labels = [f"{r['router']}\n{r['kind']}" for r in rows]
    metrics = [("eval_loss", "eval loss (lower is better)"), ("exact_match", "exact match (higher is better)")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 1.2 * len(rows) * len(metrics)), 4))
    for axis, (key, label) in zip(axes, metrics):
        values = [float(r["metrics"].get(key, float("nan"))) for r in rows]
        bars = axis.bar(range(len(rows)), values, color="#4c72b0")
        axis.bar_label(bars, fmt="%.3f", fontsize=8)
        axis.set_xticks(range(len(rows)), labels, fontsize=8)
        axis.set_title(label, fontsize=10)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
