"""What the worker batches: a composition (routed or forced per row), a plain model, or PEFT's
mixed-adapter batch (one adapter per row, for the benchmark's comparison).

Each backend runs the model's own forward with explicit position ids (rows are left padded) and
the KV cache of the batch; only the next token's logits are computed (``logits_to_keep=1``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from atmoe.row_routing import RowRouting
from atmoe.serve import kv
from atmoe.serve.engine import Job


def context_length(model: Any, tokenizer: Any) -> int:
    """The most tokens (prompt + completion) the model takes: its position table, else the tokenizer's."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 2048


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a sequence: the generation config's eos ids, else the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if isinstance(value, int):
            ids.add(value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass(frozen=True)
class PlainRows:
    """A plain model keeps nothing per row but each row's adapter (PEFT) or none."""

    adapters: tuple[str, ...]

    def select(self, rows: Tensor) -> PlainRows:
        return PlainRows(tuple(self.adapters[i] for i in rows.tolist()))


class _Forwarding:
    """The forward call shared by the backends: positions, the cache under its keyword, last logits."""

    def __init__(self, model: Any, tokenizer: Any, transformers_model: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length(transformers_model, tokenizer)
        self.eos_token_ids = eos_token_ids(transformers_model, tokenizer)
        self.device = next(transformers_model.parameters()).device
        self._cache_keyword = kv.cache_keyword(transformers_model)
        self._keep_last = "logits_to_keep" in inspect.signature(transformers_model.forward).parameters

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, **extra: Any) -> tuple[Tensor, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self._cache_keyword] = cache
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        output = self.model(**kwargs, **extra)
        return output["logits"][:, -1], kv.output_cache(output)  # [B, V]


class CompositionBackend(_Forwarding):
    """An ``AtMoEModel``: each row routed on its own prompt, or forced (``Job.force``), and held."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer, model.base_model)
        self.group_names = list(model.group_names)
        self.expert_names = list(model.expert_names)

    def check_force(self, weights: Any) -> None:
        self.model.check_forced(weights)

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, jobs: Sequence[Job]) -> tuple[Tensor, Any, Any]:
        with self.model.request(attention_mask=mask, force_rows=[job.force for job in jobs]):
            logits, cache = self._forward(ids, mask, positions, None)
            return logits, cache, self.model.row_routing()

    def decode(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, state: Any) -> tuple[Tensor, Any]:
        with self.model.request(rows=state):
            return self._forward(ids, mask, positions, cache)

    def join_states(self, states: Sequence[Any]) -> Any:
        return RowRouting.cat(states)

    def routing_of(self, state: Any, row: int) -> list[dict] | None:
        return state.row_report(row, self.group_names, self.expert_names)


class PlainBackend(_Forwarding):
    """A transformers causal LM served as it is (the base model alone)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer, model)

    def check_force(self, weights: Any) -> None:
        from atmoe.errors import RoutingError

        if weights:
            raise RoutingError("this model has no experts to force")

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, jobs: Sequence[Job]) -> tuple[Tensor, Any, Any]:
        logits, cache = self._forward(ids, mask, positions, None)
        return logits, cache, PlainRows(tuple("" for _ in jobs))

    def decode(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, state: Any) -> tuple[Tensor, Any]:
        return self._forward(ids, mask, positions, cache)

    def join_states(self, states: Sequence[Any]) -> Any:
        return PlainRows(tuple(name for state in states for name in state.adapters))

    def routing_of(self, state: Any, row: int) -> list[dict] | None:
        return None


class PeftMixedBackend(PlainBackend):
    """A ``PeftModel`` holding several LoRA adapters, each row run through one of them: PEFT's
    mixed-adapter batch (``adapter_names``), which takes no routing and no mixture. A row's adapter
    is the expert its force weighs most (the first adapter without a force)."""

    def __init__(self, model: Any, tokenizer: Any, adapters: Sequence[str]) -> None:
        _Forwarding.__init__(self, model, tokenizer, model.get_base_model())
        self.adapters = tuple(adapters)

    def check_force(self, weights: Any) -> None:
        from atmoe.errors import RoutingError

        unknown = sorted(set(weights or ()) - set(self.adapters))
        if unknown:
            raise RoutingError(f"unknown adapter {unknown[0]!r} (adapters: {', '.join(self.adapters)})")

    def _adapter(self, job: Job) -> str:
        force = job.force
        if not force:
            return self.adapters[0]
        return max(force, key=lambda name: force[name])

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, jobs: Sequence[Job]) -> tuple[Tensor, Any, Any]:
        state = PlainRows(tuple(self._adapter(job) for job in jobs))
        logits, cache = self._forward(ids, mask, positions, None, adapter_names=list(state.adapters))
        return logits, cache, state

    def decode(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, state: Any) -> tuple[Tensor, Any]:
        return self._forward(ids, mask, positions, cache, adapter_names=list(state.adapters))
