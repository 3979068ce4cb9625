"""Arrow prototypes: per block and expert, the top right singular vector of the expert's LoRA update on the
block's input, and the routers that use them (``train-router --kind arrow``).

PEFT's Arrow routes inside every LoRA linear layer on that layer's own input, with one prototype per
layer: the top right singular vector of B A. AT-MoE routes once per block, on the block's input, so
an expert's prototype for block b is the top right singular vector of its updates s B A of the block's
layers that read a hidden-size input, stacked: the input direction the expert's block update responds
to most. (Layers whose input is not hidden-size, a Llama ``down_proj`` for instance, cannot be
compared with the block's input and are left out; an expert with no such layer in a block gets a
zero prototype there.) With GenKnowSub (``gks``), the general expert's update of each layer is
subtracted from each expert's first: the top right singular vector of (s_e B_e A_e - s_g B_g A_g).
(PEFT subtracts the general adapters' mean A and mean B from each task adapter's A and B, which
changes the adapters themselves; here only the routing changes, and the experts stay as they are.)

The vector is computed exactly without forming a [d, k] matrix: with every layer's update written
M_l = B'_l A'_l, M^T M = A^T C A for A the stacked A'_l [R, k] and C the block-diagonal B'^T B' [R, R];
A^T = Q P (QR), so the top eigenvector of M^T M is Q times the top eigenvector of P C P^T [R, R].
Its sign is fixed (largest entry positive): Arrow's cosine is absolute anyway, and a fixed sign makes
prototypes reproducible byte for byte.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALGORITHM = "arrow-v1"  # part of the cache key: a change of the prototype's definition is a new key


def _layer_factors(layer, column: int, general: int | None) -> tuple[Tensor, Tensor] | None:
    """(A' [r, k], B' [d, r]) of ``column``'s update of one mixture layer (minus the general's with
    ``general``), float64; None when the expert does not adapt the layer."""
    rows = (layer.rank_column == column).nonzero().flatten()
    if rows.numel() == 0:
        return None
    scale = layer.rank_scale[rows].double()
    a = layer.A_cat[rows].double()  # [r, k]
    b = layer.B_cat[:, rows].double() * scale  # [d, r]
    if general is not None:
        g_rows = (layer.rank_column == general).nonzero().flatten()
        if g_rows.numel():
            a = torch.cat([a, layer.A_cat[g_rows].double()], 0)
            b = torch.cat([b, -layer.B_cat[:, g_rows].double() * layer.rank_scale[g_rows].double()], 1)
    return a, b


def top_right_vector(factors: list[tuple[Tensor, Tensor]], size: int) -> Tensor:
    """The top right singular vector of the stacked updates B'_l A'_l [*, size] (zeros if none), float64."""
    if not factors:
        return torch.zeros(size, dtype=torch.float64)
    a = torch.cat([f[0] for f in factors], 0)  # [R, k]
    c = torch.block_diag(*[f[1].T @ f[1] for f in factors])  # [R, R]
    q, p = torch.linalg.qr(a.T)  # a.T [k, R] = q [k, R] p [R, R]
    values, vectors = torch.linalg.eigh(p @ c @ p.T)
    if values[-1] <= 0:
        return torch.zeros(size, dtype=torch.float64)
    vector = q @ vectors[:, -1]  # [k]
    vector = vector / vector.norm()
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def expert_prototypes(model, expert: str, *, gks: bool = False) -> Tensor:
    """[num_blocks, D] float32: ``expert``'s prototype in every block (``gks``: minus the general's update)."""
    from atmoe.layer import MixtureLoraLinear

    column = model.expert_names.index(expert)
    general = len(model.expert_names) if gks else None
    out = torch.zeros(model.num_blocks, model.hidden_size, dtype=torch.float64)
    for block, routing in enumerate(model._routings):
        factors = [
            found
            for layer in routing.layers
            if isinstance(layer, MixtureLoraLinear) and layer.in_features == model.hidden_size
            if (found := _layer_factors(layer, column, general)) is not None
        ]
        out[block] = top_right_vector(factors, model.hidden_size)
    return out.float()
