"""``build_atmoe``: turn a base model and groups of LoRA experts into an ``AtMoEModel``.

The builder validates the composition, stacks each adapted linear module's experts into one
``MixtureLoraLinear`` (replacing the module in the base model, in place), finds the transformer blocks
(the outermost ``nn.ModuleList`` whose numbered children hold the adapted modules: Llama's
``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``) and gives each block that
holds an adapted module one router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import nn

from atmoe.adapters import LoraAdapter, load_adapter
from atmoe.config import AtmoeConfig
from atmoe.errors import InvalidComposition
from atmoe.layer import BlockRouting, LoraPiece, MixtureLoraLinear, linear_shape
from atmoe.model import AtMoEModel

AdapterSource = str | Path | LoraAdapter


def build_atmoe(
    base_model: nn.Module,
    groups: Mapping[str, Mapping[str, AdapterSource]],
    *,
    general: AdapterSource | None = None,
    lam: float | None = None,
    learn_lambda: bool = False,
    temperature: float = 1.0,
    routing: str = "sequence",
    router: str = "grouped",
    shared_router: bool = False,
    static_inside: bool = False,
) -> AtMoEModel:
    """Compose ``groups`` ({group: {expert: adapter dir | LoraAdapter}}, both ordered) on ``base_model``.

    ``general`` is the optional pre-merged general expert, mixed in with weight 1 - lambda. ``lam``
    defaults to 0.5 with a general expert and must be 1 (or None) without one. The base model is
    modified in place (its adapted linears become mixture layers); build from a fresh one each time.
    See ``AtmoeConfig`` for the other settings. Raises ``InvalidComposition`` for empty groups,
    duplicate experts, or adapters that do not fit the base model, ``InvalidAdapter`` for unreadable
    adapters and ``UsageError`` for bad settings.
    """
    config = AtmoeConfig(
        lam=lam,
        learn_lambda=learn_lambda,
        temperature=temperature,
        routing=routing,
        router=router,
        shared_router=shared_router,
        static_inside=static_inside,
        general=general is not None,
    )
    layout = _layout(groups)
    experts = [_as_adapter(groups[group][name], name) for group, names in layout.items() for name in names]
    if general is not None:
        experts.append(_as_adapter(general, "general"))

    modules = dict(base_model.named_modules())
    if any(isinstance(module, MixtureLoraLinear) for module in modules.values()):
        raise InvalidComposition("the base model already holds mixture layers; build from a fresh base model")
    pieces: dict[str, list[LoraPiece]] = {}
    for column, adapter in enumerate(experts):  # the general expert, last, gets column E
        for key in adapter.module_keys:
            pieces.setdefault(key, []).append(_piece(adapter, key, column, modules))

    block_of = {key: _block_path(key, modules) for key in pieces}
    order = {path: i for i, path in enumerate(modules)}
    block_paths = sorted(set(block_of.values()), key=order.__getitem__)
    routings = {path: BlockRouting() for path in block_paths}
    for key in sorted(pieces, key=order.__getitem__):
        parent_path, _, child = key.rpartition(".")
        parent = modules[parent_path] if parent_path else base_model
        setattr(parent, child, MixtureLoraLinear(modules[key], pieces[key], routings[block_of[key]]))

    return AtMoEModel(
        base_model,
        config=config,
        groups=layout,
        block_paths=block_paths,
        routings=[routings[path] for path in block_paths],
        hidden_size=_hidden_size(base_model),
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
    raise InvalidComposition(f"expert {name!r}: expected an adapter directory or a LoraAdapter, not "
                             f"{type(source).__name__}")


def _piece(adapter: LoraAdapter, key: str, column: int, modules: dict[str, nn.Module]) -> LoraPiece:
    """One adapter's A, B and scaling on module ``key``, checked against the base model."""
    label = adapter.name or "adapter"
    module = modules.get(key)
    if module is None:
        raise InvalidComposition(f"{label} adapts {key}, which the base model does not have (another base model?)")
    try:
        in_features, out_features = linear_shape(module)
    except TypeError:
        raise InvalidComposition(
            f"{label} adapts {key}, a {type(module).__name__}; only Linear and Conv1D layers can be mixed"
        ) from None
    lora_a, lora_b = adapter.lora_pair(key)
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
        raise InvalidComposition(
            f"{label} on {key}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit "
            f"{in_features} inputs and {out_features} outputs (another base model?)"
        )
    _, scale = adapter.scaling(key)
    return LoraPiece(column=column, A=lora_a, B=lora_b, scale=scale)


def _block_path(key: str, modules: dict[str, nn.Module]) -> str:
    """The transformer block of module ``key``: ``<outermost ModuleList>.<index>`` prefixing it."""
    parts = key.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and isinstance(modules.get(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[: i + 1])
    raise InvalidComposition(f"{key} is not inside a transformer block (an nn.ModuleList); AT-MoE routes per block")


def _hidden_size(base_model: nn.Module) -> int:
    config = getattr(base_model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise InvalidComposition("cannot tell the base model's hidden size (its config has no hidden_size)")
