"""The per-block routers: small float32 modules mapping a hidden state u [.., D] to routing weights.

Both routers start from zero weights and zero biases. All logits are then equal, so at the start every
group gets 1 / N_G and, inside a group of n_g real experts, every expert gets 1 / n_g (padding slots
get 0): an even split over groups, then over each group's real experts. The flat router starts even
over all E experts. Training moves them away from that neutral start; zero weights still get
gradients because the input u is not zero.

Routers run in float32 whatever the base model's dtype: ``model.to(torch.bfloat16)`` moves them to the
device but keeps their parameters float32, and the input is cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from atmoe.routing import expert_weights, flat_weights, group_totals, grouped_weights


class _Float32Router(nn.Module):
    """Routers keep float32 parameters through ``.to(dtype)`` / ``.half()`` (device moves still apply)."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        def keep_float32(tensor: Tensor) -> Tensor:
            out = fn(tensor)
            return out.float() if out.is_floating_point() else out

        return super()._apply(keep_float32, recurse)


class GroupedRouter(_Float32Router):
    """The AT-MoE two-stage router: group weights a, then inside-group weights b_g.

    W_G [D, N_G], b_G [N_G]: group logits u W_G + b_G. W_D [D, N_G*N_M], b_D [N_G*N_M]: inside-group
    logits Z = reshape(u W_D + b_D, [N_G, N_M]). With ``static_inside`` (an ablation) Z does not depend
    on u: it is a learned table ``inside_table`` [N_G, N_M].
    ``slot_mask`` [N_G, N_M] (True: real expert), ``expert_group`` and ``expert_slot`` [E] are fixed
    buffers kept out of the state dict (they are the composition, not the router).
    """

    def __init__(
        self,
        hidden_size: int,
        slot_mask: Tensor,
        expert_group: Tensor,
        expert_slot: Tensor,
        *,
        static_inside: bool = False,
    ) -> None:
        super().__init__()
        n_groups, n_max = slot_mask.shape
        self.hidden_size, self.n_groups, self.n_max = hidden_size, n_groups, n_max
        self.static_inside = static_inside
        self.W_G = nn.Parameter(torch.zeros(hidden_size, n_groups))
        self.b_G = nn.Parameter(torch.zeros(n_groups))
        if static_inside:
            self.inside_table = nn.Parameter(torch.zeros(n_groups, n_max))
        else:
            self.W_D = nn.Parameter(torch.zeros(hidden_size, n_groups * n_max))
            self.b_D = nn.Parameter(torch.zeros(n_groups * n_max))
        self.register_buffer("slot_mask", slot_mask.bool().clone(), persistent=False)
        self.register_buffer("expert_group", expert_group.long().clone(), persistent=False)
        self.register_buffer("expert_slot", expert_slot.long().clone(), persistent=False)

    def forward(self, u: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """u [.., D] -> (group_weights [.., N_G], expert_weights [.., E]), float32."""
        u = u.float()  # [.., D]
        group_logits = torch.addmm(self.b_G, u.reshape(-1, self.hidden_size), self.W_G)
        group_logits = group_logits.reshape(*u.shape[:-1], self.n_groups)  # [.., N_G]
        if self.static_inside:
            inside_logits = self.inside_table.expand(*u.shape[:-1], -1, -1)  # [.., N_G, N_M]
        else:
            inside_flat = torch.addmm(self.b_D, u.reshape(-1, self.hidden_size), self.W_D)
            inside_logits = inside_flat.reshape(*u.shape[:-1], self.n_groups, self.n_max)  # [.., N_G, N_M]
        group_w, inside_w = grouped_weights(group_logits, inside_logits, self.slot_mask, temperature)
        weights = expert_weights(group_w, inside_w, self.expert_group, self.expert_slot)  # [.., E]
        return group_w, weights


class FlatRouter(_Float32Router):
    """The single-stage ablation: w = softmax((u W + b) / tau) over all E experts.

    W [D, E], b [E]. Group weights are reported as each group's total.
    """

    def __init__(self, hidden_size: int, expert_group: Tensor, n_groups: int) -> None:
        super().__init__()
        n_experts = expert_group.shape[0]
        self.hidden_size, self.n_groups, self.n_experts = hidden_size, n_groups, n_experts
        self.W = nn.Parameter(torch.zeros(hidden_size, n_experts))
        self.b = nn.Parameter(torch.zeros(n_experts))
        self.register_buffer("expert_group", expert_group.long().clone(), persistent=False)

    def forward(self, u: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """u [.., D] -> (group_weights [.., N_G], expert_weights [.., E]), float32."""
        u = u.float()  # [.., D]
        logits = torch.addmm(self.b, u.reshape(-1, self.hidden_size), self.W)  # [N, E]
        logits = logits.reshape(*u.shape[:-1], self.n_experts)  # [.., E]
        weights = flat_weights(logits, temperature)  # [.., E]
        return group_totals(weights, self.expert_group, self.n_groups), weights


Router = GroupedRouter | FlatRouter


class InputStandardizer(_Float32Router):
    """u -> (u - shift) * scale: the feature-wise standardisation of one block's router input.

    It changes no router's function class ((u - m) s W + b is again affine in u); it conditions the
    learning. A block's pooled residual stream is a large offset shared by every request plus small
    differences between requests, whose size differs by block and by model, so plain gradient steps
    on W from zero crawl (seen on the demo: intents linearly separable, yet unlearned). Router
    training sets shift and scale to the per-feature mean and standard deviation of the training
    prompts' router inputs before it starts (``AtMoEModel.calibrating_router_inputs``); they are part
    of the router's weights. Identity until then. shift, scale: [D].
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))

    def forward(self, u: Tensor) -> Tensor:
        return (u.float() - self.shift) * self.scale  # [.., D]

    @torch.no_grad()
    def set_from_moments(self, total: Tensor, total_sq: Tensor, count: float) -> None:
        """Mean and std per feature from sums over ``count`` inputs (float64 [D] each)."""
        mean = total / count  # [D]
        var = (total_sq / count - mean * mean).clamp_min(0.0)  # [D]
        floor = 1e-4 * float(var.mean()) + 1e-12  # constant features are not blown up
        self.shift.copy_(mean.float())
        self.scale.copy_(torch.rsqrt(var + floor).float())


class ArrowRouter(_Float32Router):
    """Arrow's training-free routing (Ostapenko et al. 2024, arXiv 2405.11157; PEFT's ``ArrowConfig``):
    an input goes to the top-k experts by absolute cosine with their prototypes, then a softmax of those
    cosines over ``arrow_temperature``; the others get 0.

    Inside AT-MoE's groups the top-k runs inside each group (k capped at the group's size) and every
    group keeps an equal share 1 / N_G: Arrow's prototypes compare experts, not groups, so the group
    prior stays the neutral one of an untrained router. Under the flat router design the top-k runs over
    all experts. ``prototypes`` [E, D] (unit vectors; a zero row is an expert with no LoRA reading this
    block's input: it is picked only if nothing else is) and the two settings are buffers stored with
    the router. No parameter: nothing to train.
    """

    def __init__(
        self,
        prototypes: Tensor,
        slot_mask: Tensor,
        expert_group: Tensor,
        expert_slot: Tensor,
        *,
        top_k: int,
        temperature: float,
        flat: bool = False,
    ) -> None:
        super().__init__()
        n_groups, n_max = slot_mask.shape
        self.hidden_size, self.n_groups, self.n_max, self.flat = prototypes.shape[1], n_groups, n_max, flat
        self.register_buffer("prototypes", prototypes.float().clone())
        self.register_buffer("arrow_top_k", torch.tensor(float(top_k)))
        self.register_buffer("arrow_temperature", torch.tensor(float(temperature)))
        self.register_buffer("slot_mask", slot_mask.bool().clone(), persistent=False)
        self.register_buffer("expert_group", expert_group.long().clone(), persistent=False)
        self.register_buffer("expert_slot", expert_slot.long().clone(), persistent=False)

    def forward(self, u: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """u [.., D] -> (group_weights [.., N_G], expert_weights [.., E]); ``temperature`` (the
        composition's, for learned logits) is not Arrow's and is not used."""
        u = u.float()
        norm = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cosine = ((u / norm) @ self.prototypes.T).abs()  # [.., E]
        k, tau = int(self.arrow_top_k), float(self.arrow_temperature)
        if self.flat:
            return self._flat(cosine, k, tau)
        slots = cosine.new_full((*cosine.shape[:-1], self.n_groups, self.n_max), float("-inf"))
        slots[..., self.expert_group, self.expert_slot] = cosine  # [.., N_G, N_M], padding -inf
        top, index = slots.topk(min(k, self.n_max), dim=-1)
        kept = torch.full_like(slots, float("-inf")).scatter(-1, index, top)
        inside = torch.softmax(kept / tau, dim=-1) * self.slot_mask  # [.., N_G, N_M]
        group_w = cosine.new_full((*cosine.shape[:-1], self.n_groups), 1.0 / self.n_groups)  # [.., N_G]
        return group_w, expert_weights(group_w, inside, self.expert_group, self.expert_slot)

    def _flat(self, cosine: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor]:
        top, index = cosine.topk(min(k, cosine.shape[-1]), dim=-1)
        kept = torch.full_like(cosine, float("-inf")).scatter(-1, index, top)
        weights = torch.softmax(kept / tau, dim=-1)  # [.., E]
        return group_totals(weights, self.expert_group, self.n_groups), weights
