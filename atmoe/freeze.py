"""Which parameters train: the routers (and a learned lambda), nothing else. Free functions."""

from __future__ import annotations

from torch import nn

from atmoe.router import FlatRouter, GroupedRouter


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' parameters (each once, also when shared), then any learned lambdas of ``model``."""
    routers = [m.parameters() for m in model.modules() if isinstance(m, (GroupedRouter, FlatRouter))]
    lambdas = [getattr(m, "lambda_logits", None) or [] for m in model.modules()]
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for param in [p for group in routers + lambdas for p in group]:
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def freeze_all_but_routers(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad`` False on every parameter except the routers' and learned lambdas.

    The base weights and the experts (buffers, never trained) stay frozen. Returns the trainable ones.
    """
    trainable = router_parameters(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    return trainable
