"""A batch's KV cache as rows come and go: keep some rows, join two batches, drop dead columns.

A serving batch is left-aligned on the right: every row's newest token is the last column, and a
row's past starts after its own left padding (attention mask 0). Joining a batch whose cache is
shorter pads it on the left with zero keys and values that the mask hides; when rows leave, the
columns that no remaining row attends to are cut from the left. The cache is transformers'
``DynamicCache`` of full-attention layers, read through its ``layers`` (``keys`` / ``values``
[B, H, T, D]) and rebuilt from (keys, values) pairs; a sliding-window or recurrent cache is refused
with ``UnsupportedCache``, since its rows cannot be re-aligned this way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from atmoe.errors import AtmoeError


class UnsupportedCache(AtmoeError):
    """A model whose KV cache is not a full-attention ``DynamicCache`` (sliding windows, recurrent state)."""


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a KV cache: ``cache`` on transformers 5.x
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a forward's output, under either name."""
    if "cache" in output:
        return output["cache"]
    return output["past_key_values"]


def _pairs(cache: Any) -> list[tuple[Tensor, Tensor]]:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or [type(cache).__name__]
        raise UnsupportedCache(
            f"this model's KV cache ({', '.join(kinds)}) is not a full-attention DynamicCache: the server batches "
            "only models whose cache rows can be re-aligned"
        )
    return [(layer.keys, layer.values) for layer in layers]


def _build(pairs: Sequence[tuple[Tensor, Tensor]]) -> Any:
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=list(pairs))


def check_cache(cache: Any) -> None:
    """Raise ``UnsupportedCache`` unless ``cache`` is one this module can re-align."""
    _pairs(cache)


def select_rows(cache: Any, rows: Tensor) -> Any:
    """A cache of ``rows`` (indices [R]) only."""
    return _build([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in _pairs(cache)])


def _left_pad(tensor: Tensor, width: int, dim: int) -> Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


def join(first: Any, first_mask: Tensor, second: Any, second_mask: Tensor) -> tuple[Any, Tensor]:
    """Two batches as one: the rows of ``first`` then those of ``second``, right-aligned.

    ``*_mask`` [B, T] are the attention masks over each cache's columns; returns (cache, mask [B1+B2, T]).
    """
    a, b = _pairs(first), _pairs(second)
    width = max(first_mask.shape[1], second_mask.shape[1])
    pad_a, pad_b = width - first_mask.shape[1], width - second_mask.shape[1]
    pairs = [
        (
            torch.cat([_left_pad(ka, pad_a, 2), _left_pad(kb, pad_b, 2)], 0),  # [B1+B2, H, T, D]
            torch.cat([_left_pad(va, pad_a, 2), _left_pad(vb, pad_b, 2)], 0),
        )
        for (ka, va), (kb, vb) in zip(a, b)
    ]
    mask = torch.cat([_left_pad(first_mask, pad_a, 1), _left_pad(second_mask, pad_b, 1)], 0)  # [B1+B2, T]
    return _build(pairs), mask


def trim(cache: Any, mask: Tensor) -> tuple[Any, Tensor]:
    """Cut the leading columns that no row attends to (after rows left); returns (cache, mask)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start == 0:
        return cache, mask
    pairs = [(k[:, :, start:], v[:, :, start:]) for k, v in _pairs(cache)]
    return _build(pairs), mask[:, start:]
