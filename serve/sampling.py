"""Choosing each row's next token: greedy at temperature 0, else temperature and nucleus (top-p)
sampling from the row's own seeded generator, so that a row's tokens do not depend on its batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowSampler:
    """How one row picks its tokens. ``temperature`` 0 is greedy; ``generator`` seeds the sampling."""

    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, *, temperature: float, top_p: float, seed: int | None) -> RowSampler:
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        return cls(temperature=temperature, top_p=top_p, generator=generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def nucleus_probabilities(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution a row samples from: softmax(logits / T), kept to the smallest set of tokens
    whose mass reaches ``top_p`` (the most likely token always stays), renormalised. [V] -> [V]."""
    logits = logits.float()
    probabilities = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # [V]  finite for any T > 0
    if top_p >= 1.0:
        return probabilities
    ordered, order = probabilities.sort(descending=True)  # [V]
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = torch.zeros_like(probabilities).scatter(-1, order, ordered)  # [V]
    return kept / kept.sum()


def next_tokens(logits: Tensor, samplers: Sequence[RowSampler]) -> Tensor:
    """One token per row: ``logits`` [B, V] -> [B] (long, on the CPU)."""
    logits = logits.float().cpu()
    chosen = logits.argmax(-1)  # [B]  greedy rows keep this
    for row, sampler in enumerate(samplers):
        if sampler.greedy:
            continue
        probabilities = nucleus_probabilities(logits[row], sampler.temperature, sampler.top_p)
        chosen[row] = torch.multinomial(probabilities, 1, generator=sampler.generator)[0]
    return chosen
