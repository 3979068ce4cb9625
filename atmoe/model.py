"""``AtMoEModel``: a transformers model whose adapted linears are mixture layers, plus its routers.

(Over 400 lines by intent: one class whose parts, the request state, routing, reading and forcing the
weights, calibration and the router weights, share its private state; the small helpers at the end
are its own.)

The routing state belongs to the request, and the request is ours: ``forward`` and ``generate`` take
the user's ``input_ids``, ``attention_mask`` and ``routing_mask`` themselves and open a ``_Request``
that the routers read. Nothing is read out of the base model's own forward arguments, whose names
and shapes change between transformers releases (5.24 passes its cache as ``cache=`` and no 2-D
mask). A forward pre-hook on each routed transformer block turns the block's input hidden states
into routing weights and hands them, as coefficients, to the block's ``BlockRouting``.

- ``model(...)`` routes every call (training, evaluation).
- ``model.generate(...)`` (and ``with model.request(...)`` for a hand-written decode loop) routes
  the first forward of the request, the prompt, and holds that routing for every later forward of
  the request: sequence routing keeps the prompt's weights for the decode steps, whatever the cache
  argument is called; token routing routes each new token on its own hidden state.
- Sequence routing pools over the request's ``routing_mask``, else its ``attention_mask`` (left or
  right padding), else all tokens.
- A serving loop batches rows routed apart: ``request(force_rows=...)`` forces some rows of a prompt
  batch and routes the others; ``row_routing()`` returns each row's routing (``RowRouting``), and
  ``request(rows=...)`` runs a decode step of rows that joined from several such requests under
  their own weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from atmoe.config import AtmoeConfig, check_temperature
from atmoe.errors import AtmoeError, RoutingError
from atmoe.layer import BlockRouting
from atmoe.router import FlatRouter, GroupedRouter, InputStandardizer
from atmoe.routing import group_totals, pool_hidden
from atmoe.row_routing import RowRouting


@dataclass
class _Request:
    """One request as the routers see it.

    ``mask`` [B, T] marks the prompt tokens that sequence routing pools over (None: every token).
    ``hold``: route the request's first forward and hold that routing for its later forwards
    (decode steps). ``routed`` holds the indices of the blocks that have routed in this request.
    ``forced`` [B, E] / ``is_forced`` [B]: rows whose weights are forced (the others are routed).
    ``rows``: the routing of rows routed in earlier requests, which this request's forwards keep.
    """

    mask: Tensor | None
    hold: bool
    routed: set[int] = field(default_factory=set)
    forced: Tensor | None = None
    is_forced: Tensor | None = None
    rows: RowRouting | None = None


def _request_mask(attention_mask: Any, routing_mask: Any, input_ids: Any) -> Tensor | None:
    """The user's routing mask, else attention mask, as [B, T]; None when neither is given.

    It must be 2-D and have a row per row of ``input_ids`` (``RoutingError`` otherwise)."""
    mask = routing_mask if routing_mask is not None else attention_mask
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise RoutingError("routing_mask / attention_mask must be a [batch, tokens] tensor for routing")
    if (
        isinstance(input_ids, Tensor)
        and input_ids.dim() == 2
        and (mask.shape[0] != input_ids.shape[0] or mask.shape[1] < input_ids.shape[1])
    ):
        raise RoutingError(
            f"the routing mask is {tuple(mask.shape)} but input_ids are {tuple(input_ids.shape)}; "
            "pass the attention mask of these input_ids"
        )
    return mask


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
        router_input_modules: Mapping[int, nn.Module] | None = None,
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
        # each expert's (group, slot) and the real slots: the composition's layout, which every router reads
        self.register_buffer("expert_group_index", expert_group, persistent=False)
        self.register_buffer("expert_slot_index", expert_slot, persistent=False)
        self.register_buffer("slot_mask", slot_mask, persistent=False)
        device = next(base_model.parameters()).device

        def make_router() -> nn.Module:
            if config.router == "flat":
                return FlatRouter(hidden_size, expert_group, self.n_groups)
            return GroupedRouter(hidden_size, slot_mask, expert_group, expert_slot, static_inside=config.static_inside)

        n_routers = 1 if config.shared_router else self.num_blocks
        self.routers = nn.ModuleList([make_router() for _ in range(n_routers)]).to(device)
        # per block even when the router is shared: each block's residual stream has its own scale
        self.router_inputs = nn.ModuleList([InputStandardizer(hidden_size) for _ in range(self.num_blocks)]).to(device)
        if config.learn_lambda:
            start = math.log(config.lam / (1.0 - config.lam))  # logit(lambda)
            self.lambda_logits = nn.ParameterList(
                [nn.Parameter(torch.tensor(start, device=device)) for _ in range(self.num_blocks)]
            )
        else:
            self.lambda_logits = None

        self._forced: Tensor | None = None
        self._request: _Request | None = None
        self._last: list[tuple[Tensor, Tensor, Tensor | None] | None] = [None] * self.num_blocks
        self._blocks = [dict(base_model.named_modules())[path] for path in block_paths]
        # where each block's router reads its input: the block's input hidden states, or (the first
        # block, when the embeddings are adapted) the base embedding's output; see builder.py
        self._input_modules = dict(router_input_modules or {})
        self._hooks = [self._on_router_input(index, self._route) for index in range(self.num_blocks)]

    # ------------------------------------------------------------------ the base model's surface

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        routing_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Exactly the base model's forward (same arguments, same outputs); routes on every call.

        ``routing_mask`` [B, T] (optional) marks the tokens that sequence routing pools over, instead
        of the attention mask: router training passes the prompt tokens, so that a request is routed
        in training exactly as it is at inference, where only the prompt exists. Inside
        ``request(...)`` (and ``generate``) the request's own mask and held routing apply instead.
        """
        if self._request is not None and self._request.hold:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self._requesting(_Request(_request_mask(attention_mask, routing_mask, input_ids), hold=False)):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        routing_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's ``generate``: the prompt is routed once and its routing held for every
        decode step (sequence routing; token routing routes each new token)."""
        with self._holding(_request_mask(attention_mask, routing_mask, input_ids)):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @contextmanager
    def request(
        self,
        *,
        attention_mask: Tensor | None = None,
        routing_mask: Tensor | None = None,
        force_rows: Sequence[Mapping[str, float] | None] | None = None,
        rows: RowRouting | None = None,
    ) -> Iterator[AtMoEModel]:
        """One request: its first forward (the prompt, [B, T] like the mask) is routed, and every later
        forward inside reuses that routing; for a hand-written decode loop over a KV cache.

        ``force_rows``: one entry per row, its forced weights by expert name (checked as
        ``forced_routing`` checks them) or None to route that row. ``rows``: the ``RowRouting`` of rows
        routed before (``row_routing()`` inside their requests, ``select``-ed and ``cat``-ed): every
        forward inside keeps each row's weights (token routing routes each new token, forced rows
        keep their weights). Requests do not nest: a second ``request`` inside the first raises
        ``RoutingError``.
        """
        if force_rows is not None and rows is not None:
            raise RoutingError("a request takes force_rows (a prompt batch) or rows (routed before), not both")
        forced = is_forced = None
        if force_rows is not None:
            forced = torch.stack(
                [self._forced_vector(w) if w is not None else torch.zeros(self.num_experts) for w in force_rows]
            ).reshape(len(force_rows), self.num_experts)  # [B, E]
            is_forced = torch.tensor([w is not None for w in force_rows], dtype=torch.bool)  # [B]
        elif rows is not None:
            forced, is_forced = rows.forced, rows.is_forced
        with self._holding(_request_mask(attention_mask, routing_mask, None), forced, is_forced, rows):
            yield self

    @contextmanager
    def _holding(
        self,
        mask: Tensor | None,
        forced: Tensor | None = None,
        is_forced: Tensor | None = None,
        rows: RowRouting | None = None,
    ) -> Iterator[AtMoEModel]:
        if self._request is not None:
            raise RoutingError("a request is already open on this model; requests do not nest")
        self._invalidate()
        try:
            with self._requesting(_Request(mask, hold=True, forced=forced, is_forced=is_forced, rows=rows)):
                yield self
        finally:
            self._invalidate()  # the next request routes afresh

    @contextmanager
    def _requesting(self, request: _Request) -> Iterator[_Request]:
        self._request = request
        try:
            yield request
        finally:
            self._request = None

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

    def _on_router_input(self, index: int, fn: Callable[[int, Tensor], None], *, first: bool = False) -> Any:
        """Call ``fn(index, router_input [B, T, D])`` at every forward of block ``index``'s router input
        point; returns the hook handle. ``first``: before the hooks already there."""
        module = self._input_modules.get(index)
        # partials of bound methods, not closures: copy.deepcopy(model) then hooks the copy
        if module is not None:
            return module.register_forward_hook(functools.partial(_call_on_output, fn, index), prepend=first)
        return self._blocks[index].register_forward_pre_hook(
            functools.partial(_call_on_input, fn, index), with_kwargs=True, prepend=first
        )

    def _token_mask(self, index: int, hidden: Tensor) -> Tensor | None:
        """The request's mask for the tokens of ``hidden`` [B, T, D] entering block ``index``: [B, T].

        None means every token counts: no mask was given, or this is a decode step of a held request
        (its new tokens are all real). A mask wider than the tokens spans a KV cache's past tokens and
        the new ones (transformers' convention): its last columns are taken. ``generate`` expands a
        batch for beams or several sequences per prompt with ``repeat_interleave``; the mask is
        expanded alike. A mask that does not fit raises ``RoutingError``, never pools the wrong tokens.
        """
        request = self._request
        if request is None or request.mask is None or (request.hold and index in request.routed):
            return None
        mask = request.mask.to(hidden.device)
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if request.hold and batch != mask.shape[0] and mask.shape[0] and batch % mask.shape[0] == 0:
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)  # [B, T]
        if mask.shape[0] != batch or mask.shape[1] < tokens:
            raise RoutingError(
                f"the routing mask is {tuple(request.mask.shape)} but block inputs are [{batch}, {tokens}] "
                "tokens; pass the attention mask of these input_ids"
            )
        return mask[:, -tokens:]  # with a KV cache the mask spans past + new tokens: the new ones are last

    def _lambda(self, index: int) -> Tensor | float:
        if self.lambda_logits is not None:
            return torch.sigmoid(self.lambda_logits[index])
        return self.atmoe_config.lam

    def _route(self, index: int, hidden: Tensor) -> None:
        """Set block ``index``'s coefficients from its input hidden states [B, T, D]."""
        routing = self._routings[index]
        batch = hidden.shape[0]
        sequence = self.atmoe_config.routing == "sequence"
        request = self._request
        held = routing.coefficients
        if (
            request is not None
            and request.hold
            and index in request.routed
            and (sequence or self._forced is not None)
            and held is not None
            and held.shape[0] == batch
        ):
            return  # a later forward of a held request: keep the prompt's weights (and scale rows)
        mask = self._token_mask(index, hidden)
        if request is not None:
            request.routed.add(index)
        held_rows = request.rows if request is not None else None
        if held_rows is not None and sequence and held_rows.coefficients is not None:
            if held_rows.batch_size != batch:
                raise RoutingError(f"the request holds the routing of {held_rows.batch_size} rows, not {batch}")
            routing.set(held_rows.coefficients[index].to(hidden.device))  # [B, 1, E+1] as each row was routed
            self._last[index] = (held_rows.groups[index], held_rows.experts[index], None)
            return
        if self._forced is not None:
            weights = self._forced.to(hidden.device).expand(batch, 1, -1)  # [B, 1, E]
            group_w = group_totals(weights, self.expert_group_index, self.n_groups)  # [B, 1, N_G]
            self._last[index] = (group_w.squeeze(1), weights.squeeze(1), None)
        else:
            router = self.routers[0 if len(self.routers) == 1 else index]  # one shared, or one per block
            temperature = self.atmoe_config.temperature
            standardize = self.router_inputs[index]
            if sequence:
                u = pool_hidden(hidden, mask)  # [B, D]
                group_w, weights = router(standardize(u), temperature)  # [B, N_G], [B, E]
                group_w, weights = group_w.unsqueeze(1), weights.unsqueeze(1)  # [B, 1, N_G], [B, 1, E]
            else:
                group_w, weights = router(standardize(hidden), temperature)  # [B, T, N_G], [B, T, E]
            if request is not None and request.is_forced is not None:
                group_w, weights = self._force_rows(request, group_w, weights)
            self._last[index] = (group_w.squeeze(1), weights.squeeze(1), None) if sequence else (group_w, weights, mask)
        lam = self._lambda(index)
        general = (1.0 - lam) * weights.new_ones(*weights.shape[:-1], 1)  # [B, 1|T, 1]
        routing.set(torch.cat([lam * weights, general], dim=-1), mask)  # [B, 1|T, E+1]

    def _force_rows(self, request: _Request, group_w: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """The request's forced rows take their forced weights; the other rows keep the router's.

        ``group_w`` [B, 1|T, N_G], ``weights`` [B, 1|T, E]; the forced weights apply to every token."""
        assert request.forced is not None and request.is_forced is not None
        if request.is_forced.shape[0] != weights.shape[0]:
            raise RoutingError(f"force_rows has {request.is_forced.shape[0]} rows, the batch {weights.shape[0]}")
        forced = request.forced.to(device=weights.device, dtype=weights.dtype).unsqueeze(1)  # [B, 1, E]
        forced_groups = group_totals(forced, self.expert_group_index, self.n_groups)  # [B, 1, N_G]
        pick = request.is_forced.to(weights.device).view(-1, 1, 1)  # [B, 1, 1]
        return torch.where(pick, forced_groups, group_w), torch.where(pick, forced, weights)

    def row_routing(self) -> RowRouting:
        """Each row's routing in the open request, after its first forward (see ``RowRouting``).

        Call it inside ``request(...)``; the rows can then be kept, joined with others and passed back
        as ``request(rows=...)`` for decode steps. Under ``forced_routing`` every row is forced."""
        request = self._request
        if request is None:
            raise RoutingError("row_routing() reads the open request: call it inside model.request(...)")
        if request.rows is not None and self.atmoe_config.routing == "sequence":
            return request.rows
        per_block = self._routing_rows()
        batch = per_block[0][1].shape[0]
        if self._forced is not None:
            forced, is_forced = self._forced.expand(batch, -1), torch.ones(batch, dtype=torch.bool)
        elif request.forced is not None and request.is_forced is not None:
            forced, is_forced = request.forced, request.is_forced
        else:
            forced, is_forced = torch.zeros(batch, self.num_experts), torch.zeros(batch, dtype=torch.bool)
        coefficients = None
        if self.atmoe_config.routing == "sequence":
            coefficients = tuple(r.coefficients for r in self._routings)  # type: ignore[misc]
        return RowRouting(
            coefficients=coefficients,
            forced=forced.detach().float(),
            is_forced=is_forced,
            groups=tuple(group_w for group_w, _ in per_block),
            experts=tuple(weights for _, weights in per_block),
        )

    @contextmanager
    def calibrating_router_inputs(self, reduce: Callable[[Tensor], Tensor] | None = None) -> Iterator[AtMoEModel]:
        """Forwards inside collect every block's router inputs; on a clean exit each block's input
        standardisation becomes their per-feature mean and std (see ``InputStandardizer``).

        The inputs are collected by observer hooks that live only inside this context, so routing
        itself carries no calibration branch. ``reduce`` sums a tensor over processes
        (``accelerator.reduce(t, "sum")``) so that every data-parallel rank calibrates alike.
        Forced routing bypasses the routers: nothing is seen.
        """
        moments: list[_Moments] = [_Moments() for _ in range(self.num_blocks)]
        # prepended: each sees the router input before the routing hook marks the block routed
        observers = [
            self._on_router_input(index, functools.partial(self._observe, moments[index]), first=True)
            for index in range(self.num_blocks)
        ]
        try:
            yield self
        finally:
            for observer in observers:
                observer.remove()
        for standardize, seen in zip(self.router_inputs, moments):
            packed = seen.packed()
            if packed is None:
                continue
            if reduce is not None:
                packed = reduce(packed)
            hidden = (packed.shape[0] - 1) // 2
            standardize.set_from_moments(packed[:hidden], packed[hidden : 2 * hidden], float(packed[-1]))
        self._invalidate()

    def _observe(self, moments: _Moments, index: int, hidden: Tensor) -> None:
        """Add block ``index``'s router inputs of this forward to ``moments`` (while calibrating)."""
        if self._forced is not None:
            return
        mask = self._token_mask(index, hidden)
        if self.atmoe_config.routing == "sequence":
            inputs = pool_hidden(hidden, mask)  # [B, D]
        else:
            inputs = hidden[mask.bool()] if mask is not None else hidden  # [N, D] | [B, T, D]
        moments.add(inputs.detach())

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
        report = []
        for group_w, weights in self._routing_rows():
            group_mean, expert_mean = group_w.mean(0).tolist(), weights.mean(0).tolist()
            report.append(
                {
                    "groups": dict(zip(self.group_names, group_mean)),
                    "experts": dict(zip(self.expert_names, expert_mean)),
                }
            )
        return report

    def _routing_rows(self) -> list[tuple[Tensor, Tensor]]:
        """Per block, each row's weights of the last forward: (group_weights [B, N_G], expert_weights
        [B, E]), detached float32; token routing: each row's mean over its real tokens."""
        self._require_routed()
        rows = []
        for group_w, weights, mask in self._last:  # type: ignore[misc]
            group_w, weights = group_w.detach().float(), weights.detach().float()
            if weights.dim() == 3:  # token routing: [B, T, *] -> [B, *]
                if mask is None:
                    group_w, weights = group_w.mean(1), weights.mean(1)
                else:
                    m = mask.to(weights)
                    count = m.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1]
                    group_w = torch.einsum("bt,btg->bg", m, group_w) / count  # [B, N_G]
                    weights = torch.einsum("bt,bte->be", m, weights) / count  # [B, E]
            rows.append((group_w, weights))
        return rows

    def _require_routed(self) -> None:
        if any(entry is None for entry in self._last):
            raise AtmoeError("no routing yet: run the model on an input first")

    @contextmanager
    def forced_routing(self, weights: Mapping[str, float]) -> Iterator[AtMoEModel]:
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

    def check_forced(self, weights: Mapping[str, float]) -> None:
        """Raise ``RoutingError`` unless ``weights`` can be forced on this model (as ``forced_routing``
        checks them: known expert names, finite numbers >= 0)."""
        self._forced_vector(weights)

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
        from atmoe.freeze import router_parameters

        return router_parameters(self)

    def router_state_dict(self) -> dict[str, Tensor]:
        """What a router blob stores: ``routers.<i>.<param>``, each block's input standardisation
        ``router_inputs.<i>.shift|scale`` and ``lambda_logits.<i>``, float32 copies."""
        state = {f"routers.{k}": v for k, v in self.routers.state_dict().items()}
        state.update({f"router_inputs.{k}": v for k, v in self.router_inputs.state_dict().items()})
        if self.lambda_logits is not None:
            state.update({f"lambda_logits.{k}": v for k, v in self.lambda_logits.state_dict().items()})
        return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}

    def use_arrow_routers(self, prototypes: Tensor, *, top_k: int, temperature: float) -> None:
        """Route with Arrow (``router.ArrowRouter``): one router per block over ``prototypes``
        [num_blocks, E, D], even when the composition shares one learned router across blocks."""
        from atmoe.router import ArrowRouter

        if tuple(prototypes.shape) != (self.num_blocks, len(self.expert_names), self.hidden_size):
            raise AtmoeError(
                f"arrow prototypes of shape {tuple(prototypes.shape)} do not fit this composition "
                f"({self.num_blocks} blocks, {len(self.expert_names)} experts, hidden size {self.hidden_size})"
            )
        device = next(self.base_model.parameters()).device
        layout = (self.slot_mask.cpu(), self.expert_group_index.cpu(), self.expert_slot_index.cpu())
        flat = self.atmoe_config.router == "flat"
        self.routers = nn.ModuleList(
            [
                ArrowRouter(prototypes[block], *layout, top_k=top_k, temperature=temperature, flat=flat)
                for block in range(self.num_blocks)
            ]
        ).to(device)
        self._invalidate()

    def load_router_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``router_state_dict``; keys and shapes must match exactly (``AtmoeError`` otherwise).

        A router saved before inputs were standardised has no ``router_inputs.*``: it was trained on
        raw inputs, so it loads with the identity standardisation.
        """
        if "routers.0.prototypes" in state_dict:  # an Arrow router: its routers are made from what it stores
            try:
                prototypes = torch.stack([state_dict[f"routers.{b}.prototypes"] for b in range(self.num_blocks)])
                top_k = int(state_dict["routers.0.arrow_top_k"])
                arrow_temperature = float(state_dict["routers.0.arrow_temperature"])
            except (KeyError, RuntimeError) as error:
                raise AtmoeError(f"arrow router weights do not fit this composition ({error})") from None
            self.use_arrow_routers(prototypes.float(), top_k=top_k, temperature=arrow_temperature)
        expected = self.router_state_dict()
        if not any(key.startswith("router_inputs.") for key in state_dict):
            identity = {f"router_inputs.{i}.shift": torch.zeros(self.hidden_size) for i in range(self.num_blocks)}
            identity.update({f"router_inputs.{i}.scale": torch.ones(self.hidden_size) for i in range(self.num_blocks)})
            state_dict = {**state_dict, **identity}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise AtmoeError(
                f"router weights do not fit this composition ({what}; {len(missing)} missing, "
                f"{len(unexpected)} unexpected)"
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(expected[key].shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise AtmoeError(
                    f"router weight {key} has shape {shape}, this composition needs {tuple(expected[key].shape)}"
                )
            if not torch.isfinite(value).all():
                raise AtmoeError(f"router weight {key} holds NaN or Inf")
        with torch.no_grad():
            routers = {k[len("routers.") :]: v for k, v in state_dict.items() if k.startswith("routers.")}
            self.routers.load_state_dict({k: v.float() for k, v in routers.items()}, strict=True)
            inputs = {k[len("router_inputs.") :]: v for k, v in state_dict.items() if k.startswith("router_inputs.")}
            self.router_inputs.load_state_dict({k: v.float() for k, v in inputs.items()}, strict=True)
            if self.lambda_logits is not None:
                for i, param in enumerate(self.lambda_logits):
                    param.copy_(state_dict[f"lambda_logits.{i}"])
        self._invalidate()

    def set_temperature(self, temperature: float) -> None:
        """Change tau for the following forwards (``UsageError`` naming --temperature if not > 0)."""
        self.atmoe_config.temperature = check_temperature(temperature)
        self._invalidate()


def _call_on_input(fn: Callable[[int, Tensor], None], index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """A block's forward pre-hook: its input hidden states [B, T, D], the first argument by position or name."""
    fn(index, args[0] if args else kwargs["hidden_states"])


def _call_on_output(
    fn: Callable[[int, Tensor], None], index: int, module: nn.Module, args: tuple, output: Tensor
) -> None:
    """A forward hook on the base embedding: its output [B, T, D] is the router input."""
    fn(index, output)


class _Moments:
    """Running per-feature sums of router inputs (float64): sum, sum of squares, count."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.total_sq: Tensor | None = None
        self.count = 0.0

    def add(self, inputs: Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).double()  # [N, D]
        if self.total is None:
            self.total, self.total_sq = flat.sum(0), (flat * flat).sum(0)
        else:
            self.total += flat.sum(0)
            self.total_sq += (flat * flat).sum(0)
        self.count += float(flat.shape[0])

    def packed(self) -> Tensor | None:
        """[2D + 1]: sum, sum of squares, count; None when nothing was seen."""
        if self.total is None or self.total_sq is None:
            return None
        return torch.cat([self.total, self.total_sq, self.total.new_tensor([self.count])])
