"""``build_atmoe``: turn a base model and groups of LoRA experts into an ``AtMoEModel``.

The builder validates the composition, stacks each adapted module's experts into one
``MixtureLoraLinear`` (Linear / Conv1D) or ``MixtureLoraEmbedding`` (replacing the module in the
base model, in place), finds the transformer blocks (the outermost ``nn.ModuleList`` whose numbered
children hold the adapted modules: Llama's ``model.layers``, GPT-2's ``transformer.h``, BERT's
``encoder.layer``) and gives each block that holds an adapted module one router.

A module outside every block takes the routing of its nearest block: the first block for modules
that run before the blocks (the embeddings), the last block for those after them (``lm_head``, a
BERT pooler). The first block's router input is its own input hidden states, except when the
embeddings are adapted: their output depends on the routing, so the first block then routes on the
base embedding output (the embeddings without the experts' delta), once, for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atmoe.adapters import LoraAdapter, load_adapter
from atmoe.config import AtmoeConfig
from atmoe.errors import InvalidComposition, UsageError
from atmoe.layer import BlockRouting, LoraPiece, MixtureLoraEmbedding, MixtureLoraLinear, linear_shape
from atmoe.model import AtMoEModel

AdapterSource = str | Path | LoraAdapter


def build_atmoe(
    base_model: nn.Module,
    groups: Mapping[str, Mapping[str, AdapterSource]],
    *,
    general: AdapterSource | None = None,
    config: AtmoeConfig | None = None,
    **options: Any,
) -> AtMoEModel:
    """Compose ``groups`` ({group: {expert: adapter dir | LoraAdapter}}, both ordered) on ``base_model``.

    ``general`` is the optional pre-merged general expert, mixed in with weight 1 - lambda.
    ``config`` holds how the experts are mixed (``AtmoeConfig``); ``options`` are its fields as
    keywords instead (``lam=0.7, routing="token"``), for a config made here with ``general`` set from
    the general expert. The base model is modified in place (its adapted layers become mixture
    layers); build from a fresh one each time. Raises ``InvalidComposition`` for empty groups,
    duplicate experts, or adapters that do not fit the base model, ``InvalidAdapter`` for unreadable
    adapters and ``UsageError`` for bad settings.
    """
    if config is None:
        config = AtmoeConfig(**options, general=general is not None)
    elif options:
        raise UsageError(f"pass the settings in config or as keywords, not both ({', '.join(sorted(options))})")
    elif config.general != (general is not None):
        raise UsageError("config.general says whether there is a general expert; it disagrees with general=")
    else:
        config = dataclasses.replace(config)  # the model's own copy (set_temperature changes it)
    layout = _layout(groups)
    experts = [_as_adapter(groups[group][name], name) for group, names in layout.items() for name in names]
    if general is not None:
        experts.append(_as_adapter(general, "general"))

    modules = dict(base_model.named_modules())
    if any(isinstance(module, (MixtureLoraLinear, MixtureLoraEmbedding)) for module in modules.values()):
        raise InvalidComposition("the base model already holds mixture layers; build from a fresh base model")
    pieces: dict[str, list[LoraPiece]] = {}
    for column, adapter in enumerate(experts):  # the general expert, last, gets column E
        for key in adapter.module_keys:
            pieces.setdefault(key, []).append(_piece(adapter, key, column, modules))

    order = {path: i for i, path in enumerate(modules)}
    block_of = {key: _block_path(key, modules, order) for key in pieces}
    block_paths = sorted(set(block_of.values()), key=order.__getitem__)
    routings = {path: BlockRouting() for path in block_paths}
    router_inputs: dict[int, torch.nn.Module] = {}  # block index -> module whose output it routes on
    for key in sorted(pieces, key=order.__getitem__):
        parent_path, _, child = key.rpartition(".")
        parent = modules[parent_path] if parent_path else base_model
        routing = routings[block_of[key]]
        if isinstance(modules[key], torch.nn.Embedding):
            layer: torch.nn.Module = MixtureLoraEmbedding(modules[key], pieces[key], routing)
            router_inputs.setdefault(block_paths.index(block_of[key]), modules[key])
        else:
            layer = MixtureLoraLinear(modules[key], pieces[key], routing)
        setattr(parent, child, layer)

    return AtMoEModel(
        base_model,
        config=config,
        groups=layout,
        block_paths=block_paths,
        routings=[routings[path] for path in block_paths],
        hidden_size=_hidden_size(base_model),
        router_input_modules=router_inputs,
    )


def _layout(groups: Mapping[str, Mapping[str, AdapterSource]]) -> dict[str, list[str]]:
    """Ordered {group: [expert names]}, checking for empty groups and duplicate expert names."""
    if not isinstance(groups, Mapping) or not groups:
        raise InvalidComposition("a composition needs at least one group of experts")
    seen: dict[str, str] = {}
    layout: dict[str, list[str]] = {}
    for group, members in groups.items():
        if not isinstance(group, str) or not group:
            raise InvalidComposition(f"group names must be non-empty strings, not {group!r}")
        if not isinstance(members, Mapping) or not members:
            raise InvalidComposition(f"group {group!r} is empty; give it at least one expert")
        for name in members:
            if not isinstance(name, str) or not name:
                raise InvalidComposition(f"expert names must be non-empty strings, not {name!r} in {group!r}")
            if name in seen:
                raise InvalidComposition(f"expert {name!r} appears twice (groups {seen[name]!r} and {group!r})")
            seen[name] = group
        layout[group] = list(members)
    return layout


def _as_adapter(source: AdapterSource, name: str) -> LoraAdapter:
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, Path)):
        return load_adapter(source, name=name)
    raise InvalidComposition(
        f"expert {name!r}: expected an adapter directory or a LoraAdapter, not {type(source).__name__}"
    )


def _piece(adapter: LoraAdapter, key: str, column: int, modules: dict[str, nn.Module]) -> LoraPiece:
    """One adapter's A, B, scaling (and lora bias / DoRA gain) on module ``key``, checked against the
    base model."""
    label = adapter.name or "adapter"
    module = modules.get(key)
    if module is None:
        raise InvalidComposition(f"{label} adapts {key}, which the base model does not have (another base model?)")
    layout = adapter.modules[key]
    lora_a, lora_b = adapter.lora_pair(key)
    if layout.kind == "embedding":
        if not isinstance(module, nn.Embedding):
            raise InvalidComposition(f"{label} has embedding LoRA on {key}, a {type(module).__name__}")
        if module.max_norm is not None:
            raise InvalidComposition(f"{label} adapts {key}, an embedding with max_norm (renormalised in place)")
        in_features, out_features = module.weight.shape
        words = ("tokens", "features")
    else:
        try:
            in_features, out_features = linear_shape(module)
        except TypeError:
            raise InvalidComposition(
                f"{label} adapts {key}, a {type(module).__name__}; only Linear, Conv1D and Embedding layers "
                "can be mixed"
            ) from None
        words = ("inputs", "outputs")
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
        raise InvalidComposition(
            f"{label} on {key}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit "
            f"{in_features} {words[0]} and {out_features} {words[1]} (another base model?)"
        )
    saved_base = adapter.part(key, "base_weight")
    if saved_base is not None and not (
        tuple(saved_base.shape) == tuple(module.weight.shape)
        and torch.equal(saved_base.to(module.weight.dtype), module.weight.detach())
    ):
        raise InvalidComposition(
            f"{label} saved a base weight for {key} that differs from the base model's (resized embeddings, "
            "or another base model?); an expert may only add LoRA deltas"
        )
    _, scale = adapter.scaling(key)
    magnitude = adapter.part(key, "magnitude")
    gain = _dora_gain(module, lora_a, lora_b, scale, magnitude) if magnitude is not None else None
    return LoraPiece(column=column, A=lora_a, B=lora_b, scale=scale, bias=adapter.part(key, "B_bias"), gain=gain)


def _dora_gain(
    module: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA's g = m / ||W0 + s B A|| over each output row [d], in float32 (PEFT: ``get_weight_norm``,
    detached in eval; a Conv1D's [in, out] weight is read transposed, as fan_in_fan_out does)."""
    weight = module.weight.detach().float()
    if not isinstance(module, nn.Linear):
        weight = weight.T  # [d, k]
    merged = weight + scale * (lora_b.float() @ lora_a.float())  # [d, k]
    return magnitude.float() / torch.linalg.norm(merged, dim=1)  # [d]


def _block_path(key: str, modules: dict[str, nn.Module], order: dict[str, int]) -> str:
    """The transformer block of module ``key``: ``<outermost ModuleList>.<index>`` prefixing it; for a
    module outside every block, the first block of the model if it runs before the blocks (by
    module order: the embeddings), else the last block (``lm_head``, a pooler)."""
    parts = key.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and isinstance(modules.get(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[: i + 1])
    blocks = _block_list(modules)
    if blocks is None:
        raise InvalidComposition(f"{key} is outside any transformer block, and the model has none (an nn.ModuleList)")
    count = len(modules[blocks])
    return f"{blocks}.0" if order[key] < order[blocks] else f"{blocks}.{count - 1}"


def _block_list(modules: dict[str, nn.Module]) -> str | None:
    """The path of the model's transformer blocks: the outermost non-empty ``nn.ModuleList`` holding
    the most parameters (``model.layers``, ``transformer.h``, ``encoder.layer``)."""
    lists = [
        path
        for path, module in modules.items()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and not any(isinstance(modules.get(parent), nn.ModuleList) for parent in _ancestors(path))
    ]
    if not lists:
        return None
    return max(lists, key=lambda path: sum(p.numel() for p in modules[path].parameters()))


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _hidden_size(base_model: nn.Module) -> int:
    config = getattr(base_model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InvalidComposition("cannot tell the base model's hidden size (its config has no hidden_size)")
