"""Which parameters train: the routers (and a learned lambda), nothing else. Free functions."""

from __future__ import annotations

from torch import nn

from atmoe.router import FlatRouter, GroupedRouter


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' parameters (each once, also when shared) and any learned lambdas of ``model``."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (GroupedRouter, FlatRouter)):
            candidates = list(module.parameters())
        else:
            candidates = list(getattr(module, "lambda_logits", None) or [])
        for param in candidates:
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
