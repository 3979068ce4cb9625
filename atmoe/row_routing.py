"""The routing of each row of a batch, held across the forwards of a serving loop.

A server batches requests that arrived apart: each row was routed (or forced) on its own prompt, and
its decode steps must keep that row's weights while rows join and leave the batch. ``RowRouting`` is
that state, one tensor per block, indexed by row: ``select`` keeps some rows, ``cat`` joins batches.
``AtMoEModel.request(rows=...)`` runs forwards under it (see ``atmoe/model.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowRouting:
    """Per-row routing of B rows over the model's blocks.

    ``coefficients``: per block [B, 1, E+1], the mixing coefficients each row was routed to (sequence
    routing; None under token routing, where each new token routes on its own hidden state).
    ``forced`` [B, E] and ``is_forced`` [B] bool: the rows whose weights were forced, and the weights.
    ``groups`` [B, N_G] and ``experts`` [B, E] per block: what each row was routed to on its prompt
    (token routing: the mean over the prompt's tokens), for reports.
    """

    coefficients: tuple[Tensor, ...] | None
    forced: Tensor
    is_forced: Tensor
    groups: tuple[Tensor, ...]
    experts: tuple[Tensor, ...]

    @property
    def batch_size(self) -> int:
        return int(self.is_forced.shape[0])

    def select(self, rows: Tensor | Sequence[int]) -> RowRouting:
        """The routing of ``rows`` (indices into this batch), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.is_forced.device)

        def pick(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return tuple(t.index_select(0, index.to(t.device)) for t in tensors)

        return RowRouting(
            coefficients=pick(self.coefficients) if self.coefficients is not None else None,
            forced=self.forced.index_select(0, index.to(self.forced.device)),
            is_forced=self.is_forced.index_select(0, index),
            groups=pick(self.groups),
            experts=pick(self.experts),
        )

    @staticmethod
    def cat(parts: Sequence[RowRouting]) -> RowRouting:
        """The rows of ``parts`` one batch after the other (all of one model)."""
        if not parts:
            raise ValueError("RowRouting.cat needs at least one part")
        if len(parts) == 1:
            return parts[0]

        def join(field: str) -> tuple[Tensor, ...]:
            per_part = [getattr(part, field) for part in parts]
            return tuple(torch.cat(blocks, 0) for blocks in zip(*per_part))

        sequence = parts[0].coefficients is not None
        return RowRouting(
            coefficients=join("coefficients") if sequence else None,
            forced=torch.cat([p.forced for p in parts], 0),
            is_forced=torch.cat([p.is_forced for p in parts], 0),
            groups=join("groups"),
            experts=join("experts"),
        )

    def row_report(self, row: int, group_names: Sequence[str], expert_names: Sequence[str]) -> list[dict]:
        """Row ``row``'s routing per block, by name: ``[{"groups": {g: w}, "experts": {e: w}}, ...]``
        (the shape of ``AtMoEModel.last_routing()``)."""
        return [
            {
                "groups": dict(zip(group_names, groups[row].float().tolist())),
                "experts": dict(zip(expert_names, experts[row].float().tolist())),
            }
            for groups, experts in zip(self.groups, self.experts)
        ]
