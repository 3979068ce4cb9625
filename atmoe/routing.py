"""The routing math of AT-MoE (DESIGN.md section 2), as pure functions on tensors.

No modules, no state, no I/O: the routers in ``router.py`` produce logits, these functions turn them
into weights. Shapes use B batch, T tokens, D hidden size, N_G groups, N_M largest group size,
E experts; ``..`` is any leading shape ([B] for sequence routing, [B, T] for token routing).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pool_hidden(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of each row's hidden states over its real (mask == 1) tokens, returned in float32.

    hidden [B, T, D], mask [B, T] (1 real, 0 padding; None: all real) -> [B, D].
    The sum is one batched matmul in the hidden states' own dtype (float32 accumulation inside the
    matmul), so a bf16 model reads its hidden states once and makes no float32 copy of them; padding
    hidden states must be finite (transformers keeps them so). A row without real tokens pools to 0.
    """
    batch, tokens, _ = hidden.shape
    if mask is None:
        mask = hidden.new_ones(batch, tokens)  # [B, T]
    weights = mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(1)  # [B, 1, T]
    summed = torch.bmm(weights, hidden).squeeze(1).float()  # [B, D]  sum of real tokens
    count = weights.float().sum(dim=-1).clamp_min(1.0)  # [B, 1]
    return summed / count  # [B, D]


def grouped_weights(
    group_logits: Tensor, inside_logits: Tensor, slot_mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """The two-stage softmax: a = softmax(group_logits / tau); b_g = softmax(Z[g] / tau), padding -inf.

    group_logits [.., N_G], inside_logits [.., N_G, N_M], slot_mask [N_G, N_M] bool (True: a real
    expert) -> (group_weights [.., N_G], inside_weights [.., N_G, N_M]). Padding slots get exactly 0;
    every group has at least one real slot, so no row is all -inf.
    """
    group_weights = torch.softmax(group_logits / temperature, dim=-1)  # [.., N_G]
    inside_logits = inside_logits.masked_fill(~slot_mask, float("-inf"))  # [.., N_G, N_M]
    inside_weights = torch.softmax(inside_logits / temperature, dim=-1)  # [.., N_G, N_M]
    return group_weights, inside_weights


def expert_weights(group_weights: Tensor, inside_weights: Tensor, expert_group: Tensor, expert_slot: Tensor) -> Tensor:
    """w_e = a[g(e)] * b[g(e), m(e)]: the weight of each real expert; they sum to 1.

    group_weights [.., N_G], inside_weights [.., N_G, N_M], expert_group [E] and expert_slot [E]
    (long) -> [.., E].
    """
    of_group = group_weights[..., expert_group]  # [.., E]   a[g(e)]
    in_group = inside_weights[..., expert_group, expert_slot]  # [.., E]   b[g(e), m(e)]
    return of_group * in_group  # [.., E]


def flat_weights(logits: Tensor, temperature: float) -> Tensor:
    """The single-stage ablation: one softmax over all experts. logits [.., E] -> [.., E]."""
    return torch.softmax(logits / temperature, dim=-1)  # [.., E]


def group_totals(weights: Tensor, expert_group: Tensor, n_groups: int) -> Tensor:
    """The weight each group receives in total (to report flat or forced routing by group).

    weights [.., E], expert_group [E] (long) -> [.., N_G].
    """
    totals = weights.new_zeros(*weights.shape[:-1], n_groups)  # [.., N_G]
    return totals.index_add(-1, expert_group, weights)  # [.., N_G]
