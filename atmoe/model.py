"""``AtMoEModel``: a transformers model whose adapted linears are mixture layers, plus its routers.

The wrapper adds no forward logic of its own; it works through two kinds of forward pre-hooks:

- on the base model: capture the request (its attention mask, and whether a KV cache already holds
  tokens, i.e. whether this is a decode step). ``model(...)`` and ``model.generate(...)`` both reach
  the base model's ``forward``, so both are seen.
- on each routed transformer block: turn the block's input hidden states into routing weights and
  hand them, as coefficients, to the block's ``BlockRouting`` that its mixture layers read.

Sequence routing pools the prompt's hidden states with the attention mask at the first forward of a
request and keeps the weights for the decode steps that follow (so a KV cache works); token routing
routes every token of every forward.
"""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from atmoe.config import AtmoeConfig, check_temperature
from atmoe.errors import AtmoeError, RoutingError
from atmoe.layer import BlockRouting
from atmoe.router import FlatRouter, GroupedRouter, InputStandardizer
from atmoe.routing import group_totals, pool_hidden


def _cache_length(past: Any) -> int:
    """Tokens already held by a KV cache (a transformers Cache or a legacy tuple); 0 for none."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None and len(past[0]) > 0:
        return int(past[0][0].shape[-2])
    return 0


class AtMoEModel(nn.Module):
    """A base transformers model with routed mixtures of frozen LoRA experts (see ARCHITECTURE.md).

    Built by ``atmoe.build_atmoe``; calls and ``generate`` take the base model's arguments and return
    its outputs. Attributes the wrapper does not define (``config``, ``generation_config``,
    ``can_generate``...) are those of the base model.
    """

    def __init__(
        self,
        base_model: nn.Module,
        *,
        config: AtmoeConfig,
        groups: Mapping[str, list[str]],
        block_paths: list[str],
        routings: list[BlockRouting],
        hidden_size: int,
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.atmoe_config = config
        self.group_names = list(groups)
        self.expert_names = [name for names in groups.values() for name in names]
        self.expert_groups = {name: group for group, names in groups.items() for name in names}
        self.n_groups = len(self.group_names)
        self.n_max = max(len(names) for names in groups.values())
        self.num_blocks = len(block_paths)
        self.block_paths = list(block_paths)
        self.hidden_size = hidden_size
        self._routings = list(routings)

        expert_group = torch.tensor([self.group_names.index(self.expert_groups[e]) for e in self.expert_names])
        expert_slot = torch.tensor([groups[self.expert_groups[e]].index(e) for e in self.expert_names])
        slot_mask = torch.zeros(self.n_groups, self.n_max, dtype=torch.bool)
        slot_mask[expert_group, expert_slot] = True
        self.register_buffer("expert_group_index", expert_group, persistent=False)
        device = next(base_model.parameters()).device

        def make_router() -> nn.Module:
            if config.router == "flat":
                return FlatRouter(hidden_size, expert_group, self.n_groups)
            return GroupedRouter(
                hidden_size, slot_mask, expert_group, expert_slot, static_inside=config.static_inside
            )

        n_routers = 1 if config.shared_router else self.num_blocks
        self.routers = nn.ModuleList([make_router() for _ in range(n_routers)]).to(device)
        # per block even when the router is shared: each block's residual stream has its own scale
        self.router_inputs = nn.ModuleList([InputStandardizer(hidden_size) for _ in range(self.num_blocks)]).to(device)
        self._input_moments: list[list[Any] | None] | None = None  # set while calibrating
        if config.learn_lambda:
            start = math.log(config.lam / (1.0 - config.lam))  # logit(lambda)
            self.lambda_logits = nn.ParameterList(
                [nn.Parameter(torch.tensor(start, device=device)) for _ in range(self.num_blocks)]
            )
        else:
            self.lambda_logits = None

        self._forced: Tensor | None = None
        self._routing_mask: Tensor | None = None
        self._mask: Tensor | None = None
        self._decoding = False
        self._last: list[tuple[Tensor, Tensor, Tensor | None] | None] = [None] * self.num_blocks
        self._signature = inspect.signature(base_model.forward)
        self._hooks = [base_model.register_forward_pre_hook(self._capture_request, with_kwargs=True)]
        modules = dict(base_model.named_modules())
        for index, path in enumerate(block_paths):
            # a partial of a bound method, not a closure: copy.deepcopy(model) then hooks the copy
            hook = functools.partial(self._block_hook, index)
            self._hooks.append(modules[path].register_forward_pre_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------ the base model's surface

    def forward(self, *args: Any, routing_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """Exactly the base model's forward (same arguments, same outputs).

        ``routing_mask`` [B, T] (optional) marks the tokens that sequence routing pools over, instead
        of the attention mask: router training passes the prompt tokens, so that a request is routed
        in training exactly as it is at inference, where only the prompt exists.
        """
        self._routing_mask = routing_mask
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._routing_mask = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``; the hooks route the prompt and reuse it for decoding."""
        return self.base_model.generate(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    # ------------------------------------------------------------------ hooks

    def _capture_request(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = self._signature.bind_partial(*args, **kwargs).arguments if args else kwargs
        mask = self._routing_mask if self._routing_mask is not None else arguments.get("attention_mask")
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self._decoding = _cache_length(arguments.get("past_key_values")) > 0

    def _block_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._route(index, hidden)

    def _token_mask(self, hidden: Tensor) -> Tensor | None:
        """The captured attention mask's columns for these tokens [B, T], or None when it does not fit."""
        mask = self._mask
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if mask is None or mask.shape[0] != batch or mask.shape[1] < tokens:
            return None
        return mask[:, -tokens:]

    def _lambda(self, index: int) -> Tensor | float:
        if self.lambda_logits is not None:
            return torch.sigmoid(self.lambda_logits[index])
        return self.atmoe_config.lam

    def _route(self, index: int, hidden: Tensor) -> None:
        """Set block ``index``'s coefficients from its input hidden states [B, T, D]."""
        routing = self._routings[index]
        batch = hidden.shape[0]
        sequence = self.atmoe_config.routing == "sequence"
        held = routing.coefficients
        if self._decoding and (sequence or self._forced is not None) and held is not None and held.shape[0] == batch:
            return  # a decode step: keep the prompt's weights (and their cached scale rows)
        mask = self._token_mask(hidden)
        if self._forced is not None:
            weights = self._forced.to(hidden.device).expand(batch, 1, -1)                # [B, 1, E]
            group_w = group_totals(weights, self.expert_group_index, self.n_groups)      # [B, 1, N_G]
            self._last[index] = (group_w.squeeze(1), weights.squeeze(1), None)
        else:
            router = self.routers[0 if self.atmoe_config.shared_router else index]
            temperature = self.atmoe_config.temperature
            standardize = self.router_inputs[index]
            if sequence:
                u = pool_hidden(hidden, mask)                                            # [B, D]
                self._observe(index, u)
                group_w, weights = router(standardize(u), temperature)                   # [B, N_G], [B, E]
                self._last[index] = (group_w, weights, None)
                weights = weights.unsqueeze(1)                                           # [B, 1, E]
            else:
                self._observe(index, hidden, mask)
                group_w, weights = router(standardize(hidden), temperature)              # [B, T, N_G], [B, T, E]
                self._last[index] = (group_w, weights, mask)
        lam = self._lambda(index)
        general = (1.0 - lam) * weights.new_ones(*weights.shape[:-1], 1)                 # [B, 1|T, 1]
        routing.set(torch.cat([lam * weights, general], dim=-1))                         # [B, 1|T, E+1]

    def _observe(self, index: int, inputs: Tensor, mask: Tensor | None = None) -> None:
        """While calibrating, add router inputs [B, D] (or [B, T, D] with mask [B, T]: the real
        tokens) to block ``index``'s running moments. A no-op otherwise."""
        if self._input_moments is None:
            return
        if mask is not None:
            inputs = inputs[mask.bool()]                                                 # [N, D]
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).double()                    # [N, D]
        moments = self._input_moments[index]
        if moments is None:
            self._input_moments[index] = [flat.sum(0), (flat * flat).sum(0), float(flat.shape[0])]
        else:
            moments[0] += flat.sum(0)
            moments[1] += (flat * flat).sum(0)
            moments[2] += float(flat.shape[0])

    @contextmanager
    def calibrating_router_inputs(self, reduce=None) -> Iterator["AtMoEModel"]:
        """Forwards inside collect every block's router inputs; on a clean exit each block's input
        standardisation becomes their per-feature mean and std (see ``InputStandardizer``).

        ``reduce`` sums a tensor over processes (``accelerator.reduce(t, "sum")``) so that every
        data-parallel rank calibrates alike. Forced routing bypasses the routers: nothing is seen.
        """
        self._input_moments = [None] * self.num_blocks
        try:
            yield self
            moments = self._input_moments
        finally:
            self._input_moments = None
        for standardize, seen in zip(self.router_inputs, moments):
            if seen is None:
                continue
            packed = torch.cat([seen[0], seen[1], seen[0].new_tensor([seen[2]])])        # [2D + 1]
            if reduce is not None:
                packed = reduce(packed)
            hidden = seen[0].shape[0]
            standardize.set_from_moments(packed[:hidden], packed[hidden:2 * hidden], float(packed[-1]))
        self._invalidate()

    # ------------------------------------------------------------------ routing, read and forced

    def last_routing_tensors(self) -> list[tuple[Tensor, Tensor]]:
        """Per routed block (group_weights [B, N_G] | [B, T, N_G], expert_weights [B, E] | [B, T, E])
        of the last forward; they keep their graph in training (for auxiliary losses)."""
        self._require_routed()
        return [(group_w, weights) for group_w, weights, _ in self._last]  # type: ignore[misc]

    def last_routing(self) -> list[dict[str, dict[str, float]]]:
        """Per routed block {"groups": {g: w}, "experts": {e: w}} of the last forward, by name.

        Sequence routing: the mean over the batch. Token routing: each row's mean over its real
        (attention mask 1) tokens, then the mean over rows. Under ``forced_routing``: the forced weights.
        """
        self._require_routed()
        report = []
        for group_w, weights, mask in self._last:  # type: ignore[misc]
            group_w, weights = group_w.detach().float(), weights.detach().float()
            if weights.dim() == 3:  # token routing: [B, T, *] -> [B, *]
                if mask is None:
                    group_w, weights = group_w.mean(1), weights.mean(1)
                else:
                    m = mask.to(weights)
                    count = m.sum(1, keepdim=True).clamp_min(1.0)                        # [B, 1]
                    group_w = torch.einsum("bt,btg->bg", m, group_w) / count             # [B, N_G]
                    weights = torch.einsum("bt,bte->be", m, weights) / count             # [B, E]
            group_mean, expert_mean = group_w.mean(0).tolist(), weights.mean(0).tolist()
            report.append(
                {
                    "groups": dict(zip(self.group_names, group_mean)),
                    "experts": dict(zip(self.expert_names, expert_mean)),
                }
            )
        return report

    def _require_routed(self) -> None:
        if any(entry is None for entry in self._last):
            raise AtmoeError("no routing yet: run the model on an input first")

    @contextmanager
    def forced_routing(self, weights: Mapping[str, float]) -> Iterator["AtMoEModel"]:
        """Use these expert weights (by name) in every block instead of the routers'.

        Missing experts get 0; weights are not renormalised; lambda and the general expert still
        apply. Unknown names or negative / non-finite weights raise ``RoutingError``.
        """
        vector = self._forced_vector(weights)
        previous = self._forced
        self._forced = vector
        self._invalidate()
        try:
            yield self
        finally:
            self._forced = previous
            self._invalidate()

    def _forced_vector(self, weights: Mapping[str, float]) -> Tensor:
        if not isinstance(weights, Mapping):
            raise RoutingError("forced routing takes a mapping of expert name to weight")
        vector = torch.zeros(self.num_experts, dtype=torch.float32)
        for name, value in weights.items():
            if name not in self.expert_groups:
                known = ", ".join(self.expert_names)
                raise RoutingError(f"unknown expert {name!r} in forced routing (experts: {known})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RoutingError(f"forced weight of {name!r} must be a finite number, not {value!r}")
            if value < 0:
                raise RoutingError(f"forced weight of {name!r} must be >= 0, not {value!r}")
            vector[self.expert_names.index(name)] = float(value)
        return vector

    def _invalidate(self) -> None:
        """Forget held coefficients so that the next forward routes afresh."""
        for routing in self._routings:
            routing.clear()

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    # ------------------------------------------------------------------ training surface

    def router_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: the routers' (once each if shared) and the learned lambdas."""
        params = list(self.routers.parameters())
        if self.lambda_logits is not None:
            params += list(self.lambda_logits)
        return params

    def router_state_dict(self) -> dict[str, Tensor]:
        """What a router blob stores: ``routers.<i>.<param>``, each block's input standardisation
        ``router_inputs.<i>.shift|scale`` and ``lambda_logits.<i>``, float32 copies."""
        state = {f"routers.{k}": v for k, v in self.routers.state_dict().items()}
        state.update({f"router_inputs.{k}": v for k, v in self.router_inputs.state_dict().items()})
        if self.lambda_logits is not None:
            state.update({f"lambda_logits.{k}": v for k, v in self.lambda_logits.state_dict().items()})
        return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}

    def load_router_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``router_state_dict``; keys and shapes must match exactly (``AtmoeError`` otherwise).

        A router saved before inputs were standardised has no ``router_inputs.*``: it was trained on
        raw inputs, so it loads with the identity standardisation.
        """
        expected = self.router_state_dict()
        if not any(key.startswith("router_inputs.") for key in state_dict):
            identity = {f"router_inputs.{i}.shift": torch.zeros(self.hidden_size) for i in range(self.num_blocks)}
            identity.update({f"router_inputs.{i}.scale": torch.ones(self.hidden_size) for i in range(self.num_blocks)})
            state_dict = {**state_dict, **identity}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise AtmoeError(f"router weights do not fit this composition ({what}; {len(missing)} missing, "
                             f"{len(unexpected)} unexpected)")
        for key, value in state_dict.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(expected[key].shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise AtmoeError(
                    f"router weight {key} has shape {shape}, this composition needs {tuple(expected[key].shape)}"
                )
            if not torch.isfinite(value).all():
                raise AtmoeError(f"router weight {key} holds NaN or Inf")
        with torch.no_grad():
            routers = {k[len("routers."):]: v for k, v in state_dict.items() if k.startswith("routers.")}
            self.routers.load_state_dict({k: v.float() for k, v in routers.items()}, strict=True)
            inputs = {k[len("router_inputs."):]: v for k, v in state_dict.items() if k.startswith("router_inputs.")}
            self.router_inputs.load_state_dict({k: v.float() for k, v in inputs.items()}, strict=True)
            if self.lambda_logits is not None:
                for i, param in enumerate(self.lambda_logits):
                    param.copy_(state_dict[f"lambda_logits.{i}"])
        self._invalidate()

    def set_temperature(self, temperature: float) -> None:
        """Change tau for the following forwards (``UsageError`` naming --temperature if not > 0)."""
        self.atmoe_config.temperature = check_temperature(temperature)
        self._invalidate()
