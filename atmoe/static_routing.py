"""Static routers: every block's router set to give the same weights whatever the input.

A router kind that learns no function of the input (``lorahub``'s searched weights) is still a router
of the composition: its weights are stored and loaded like a trained one's, and it routes everywhere a
router does. Zero W and biases of tau * log(weight) do that exactly for every router design: the
grouped router's group logits give softmax(log a) = a and its inside logits softmax(log b_g) = b_g,
where a_g is group g's total and b_g = w / a_g inside it; the flat router's logits give w.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from atmoe.errors import UsageError

FLOOR = 1e-12  # log(0) is -inf: a weight of 0 becomes this (its softmax share is < 1e-12)


def grouped_parts(model, weights: Mapping[str, float]) -> tuple[list[float], list[list[float]]]:
    """(group totals a [N_G], inside shares b [N_G][N_M]) of per-expert ``weights`` that sum to 1 in all;
    a group of weight 0 shares its inside evenly (any share gives the same mixture)."""
    unknown = sorted(set(weights) - set(model.expert_names))
    if unknown:
        raise UsageError(f"not an expert of the composition: {', '.join(unknown)}")
    values = {name: float(weights.get(name, 0.0)) for name in model.expert_names}
    if any(not math.isfinite(v) or v < 0 for v in values.values()):
        raise UsageError("static weights must be finite and >= 0")
    total = sum(values.values())
    if total <= 0:
        raise UsageError("static weights must not all be 0")
    values = {name: v / total for name, v in values.items()}
    totals = [0.0] * model.n_groups
    inside = [[0.0] * model.n_max for _ in range(model.n_groups)]
    positions = _positions(model)
    for name, (g, _) in zip(model.expert_names, positions):
        totals[g] += values[name]
    sizes = [sum(1 for g, _ in positions if g == group) for group in range(model.n_groups)]
    for name, (g, slot) in zip(model.expert_names, positions):
        inside[g][slot] = values[name] / totals[g] if totals[g] > 0 else 1.0 / sizes[g]
    return totals, inside


@torch.no_grad()
def set_static_weights(model, weights: Mapping[str, float]) -> None:
    """Make every router of ``model`` give ``weights`` (normalised to sum to 1) for any input."""
    from atmoe.router import FlatRouter

    tau = model.atmoe_config.temperature
    totals, inside = grouped_parts(model, weights)

    def log(values: list[float]) -> torch.Tensor:
        return torch.tensor([tau * math.log(max(v, FLOOR)) for v in values], dtype=torch.float32)

    for router in model.routers:
        for parameter in router.parameters():
            parameter.zero_()
        if isinstance(router, FlatRouter):
            flat = [totals[int(g)] * inside[int(g)][slot] for g, slot in _positions(model)]
            router.b.copy_(log(flat))
            continue
        router.b_G.copy_(log(totals))
        table = torch.stack([log(row) for row in inside])  # [N_G, N_M]; padding slots are masked anyway
        if router.static_inside:
            router.inside_table.copy_(table)
        else:
            router.b_D.copy_(table.reshape(-1))


def _positions(model) -> list[tuple[int, int]]:
    """(group index, slot) of each expert, in ``model.expert_names`` order (the model's layout)."""
    return list(zip(model.expert_group_index.tolist(), model.expert_slot_index.tolist()))
