"""``train-router --init prompts``: routers that start from the hidden states of each expert's example
prompts instead of from zero, as mergekit-moe's "hidden" gate initialisation does.

mergekit-moe gives each expert a few positive prompts and sets its gate row at every layer to the
(normalised) mean hidden state of those prompts. Here an expert's example prompts are the training
examples whose ``intents`` name it, and the hidden state is the block's router input after its
standardisation (the calibration pass runs first), pooled over the prompt as sequence routing pools it.
Per block b and expert e, m_be is the mean of those inputs and d_be = m_be / |m_be|; the router's
inside-group column of e (the flat router's column of e) becomes SCALE * d_be / sqrt(D), and group g's
column the same of the mean of its experts' means, biases 0. A standardised input has norm about
sqrt(D), so the logits start at about SCALE times the cosine between the prompt and each expert's
examples. An expert no example names keeps its zero column (logit 0), and the count of examples per
expert is recorded. The static-inside ablation's table takes no input: it stays zero.
"""

from __future__ import annotations

import math

import torch

from atmoe.errors import UsageError
from atmoe.routing import pool_hidden

SCALE = 4.0


@torch.no_grad()
def prompt_means(model, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per block, the mean standardised router input of each expert's example prompts [E, D]; and the
    number of examples naming each expert [E]. ``batches`` yield collated training batches."""
    n_experts = len(model.expert_names)
    sums = [torch.zeros(n_experts, model.hidden_size, dtype=torch.float64) for _ in range(model.num_blocks)]
    counts = torch.zeros(n_experts, dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def observe(index: int, hidden: torch.Tensor) -> None:
        mask = model._token_mask(index, hidden)
        u = model.router_inputs[index](pool_hidden(hidden, mask))  # [B, D]
        sums[index] += current["intents"].to(torch.float64).T.cpu() @ u.to(torch.float64).cpu()  # [E, D]

    hooks = [model._on_router_input(index, observe, first=True) for index in range(model.num_blocks)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["intents"] = batch["intent_mask"]
            counts += batch["intent_mask"].to(torch.float64).sum(0).cpu()
            prompt_mask = (batch["labels"] == -100) & batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], routing_mask=prompt_mask.long())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not counts.any():
        raise UsageError("--init prompts needs training examples whose 'intents' name the experts")
    means = [s / counts.clamp_min(1).unsqueeze(1) for s in sums]
    return means, counts


def _direction(vector: torch.Tensor) -> torch.Tensor:
    norm = vector.norm()
    return vector / norm if norm > 0 else vector


@torch.no_grad()
def init_from_prompts(model, batches) -> dict[str, int]:
    """Set every router of ``model`` from its experts' example prompts; returns examples per expert."""
    from atmoe.router import FlatRouter

    means, counts = prompt_means(model, batches)
    shared = model.atmoe_config.shared_router
    scale = SCALE / math.sqrt(model.hidden_size)
    groups, slots = model.expert_group_index.tolist(), model.expert_slot_index.tolist()
    for index, router in enumerate(model.routers):
        block_means = torch.stack(means).mean(0) if shared else means[index]  # [E, D]
        for parameter in router.parameters():
            parameter.zero_()
        for e, (g, slot) in enumerate(zip(groups, slots)):
            if counts[e] == 0:
                continue
            column = (scale * _direction(block_means[e])).float()
            if isinstance(router, FlatRouter):
                router.W[:, e] = column
            elif not router.static_inside:
                router.W_D[:, g * router.n_max + slot] = column
        if isinstance(router, FlatRouter):
            continue
        for g in range(model.n_groups):
            members = [e for e, eg in enumerate(groups) if eg == g and counts[e] > 0]
            if members:
                router.W_G[:, g] = (scale * _direction(block_means[members].mean(0))).float()
    model._invalidate()
    return {name: int(counts[e]) for e, name in enumerate(model.expert_names)}
