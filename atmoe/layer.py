"""The fused mixture of frozen LoRA experts on one linear layer (DESIGN.md section 2).

    y = W0 x + lambda * sum_e w_e s_e B_e A_e x + (1 - lambda) s_p B_p A_p x

The experts that adapt the layer (and the general expert p, if any) are stacked once, at build time,
into A_cat [R, k] and B_cat [d, R] with R = sum of their ranks, so the mixture costs two matmuls
whatever the number of experts, and never a [tokens, E, d] tensor:

    h = x @ A_cat.T                      # [B, T, R]
    h = h * scale_row                    # per rank row: lambda w_e s_e, or (1 - lambda) s_p
    y = W0 x + h @ B_cat.T

The general expert is just one more block of rows whose coefficient is (1 - lambda) instead of
lambda w_e. Two exact extensions, paid only by the layers that need them:

- ``lora_bias`` experts add c_e s_e b_e (PEFT scales lora_B's bias with the rest of lora_B's output):
  one [B, 1|T, P] x [P, d] product over the P pieces that carry a bias.
- DoRA experts rescale: with g_e = m_e / ||W0 + s_e B_e A_e|| (row norms, static in eval, as PEFT
  detaches them) PEFT's expert alone computes W0 x + (g_e - 1) W0 x + g_e s_e B_e A_e x, so the
  mixture is W0 x (1 + sum_e c_e (g_e - 1)) + sum_e c_e s_e (g_e B_e) A_e x: g_e is folded into
  B_cat at build time, and the base output is rescaled by one [B, 1|T, P] x [P, d] product.

``MixtureLoraEmbedding`` is the same two-matmul mixture on an ``nn.Embedding`` (lora_embedding_A/B). The coefficients come from the block's ``BlockRouting``, which the block's router hook
fills once per forward; layers of a block that stack the same experts share one scale row.
LoRA dropout is not applied (the experts are frozen: eval semantics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atmoe.routing import pool_hidden

try:  # GPT-2 style layers: weight [in, out], y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep layer.py importable
    Conv1D = None  # type: ignore[assignment, misc]


@dataclass(frozen=True)
class LoraPiece:
    """One adapter's contribution to one layer: A [r, k], B [d, r], scaling s, and its column.

    ``column`` indexes the block's coefficient vector: 0..E-1 for the experts, E for the general one.
    """

    column: int
    A: Tensor
    B: Tensor
    scale: float
    bias: Tensor | None = None  # [d] lora_B's bias (lora_bias=True)
    gain: Tensor | None = None  # [d] DoRA's g = m / ||W0 + s B A|| per output row


class BlockRouting:
    """The mixing coefficients of one transformer block for the current forward pass.

    ``coefficients`` [B, 1, E+1] (sequence routing) or [B, T, E+1] (token routing), float32:
    lambda * w_e for each expert, then (1 - lambda) for the general expert. The router hook calls
    ``set`` before the block runs; ``set`` computes at once the scale row of every distinct stack
    among the block's layers (layers stacking the same experts share one), so that the layers only
    read them: nothing routing-related is computed inside the block's own forward (which gradient
    checkpointing may replay).
    """

    def __init__(self) -> None:
        self.coefficients: Tensor | None = None
        self._mask: Tensor | None = None  # token routing: [B, T] real tokens, for pooled coefficients
        self._pooled: Tensor | None = None
        self.layers: list[MixtureLoraLinear | MixtureLoraEmbedding] = []
        self._rows: dict[tuple[int, torch.dtype], Tensor] = {}
        # one small integer per distinct stack signature among this block's layers: the scale-row key
        self._stack_ids: dict[tuple, int] = {}

    def add_layer(self, layer: MixtureLoraLinear | MixtureLoraEmbedding, signature: tuple) -> int:
        """Register ``layer``; returns the id of its stack (layers with equal signatures share rows)."""
        self.layers.append(layer)
        return self._stack_ids.setdefault(signature, len(self._stack_ids))

    def set(self, coefficients: Tensor, mask: Tensor | None = None) -> None:
        """``coefficients`` [B, 1|T, E+1]; ``mask`` [B, T] (token routing): the real tokens, should a
        layer without a token axis (a pooler's [B, D]) ask for each row's mean coefficients."""
        self.coefficients = coefficients
        self._mask, self._pooled = mask, None
        rows: dict[tuple, Tensor] = {}
        for layer in self.layers:
            key = (layer.stack_id, layer.A_cat.dtype)
            if key not in rows:
                picked = coefficients.index_select(-1, layer.rank_column)  # [B, 1|T, R]
                rows[key] = (picked * layer.rank_scale).to(layer.A_cat.dtype)  # [B, 1|T, R]
                for extra in layer.extras:  # lora biases, DoRA gains: [B, 1|T, P]
                    column = getattr(layer, f"{extra}_column")
                    rows[(extra, *key)] = coefficients.index_select(-1, column).to(layer.A_cat.dtype)
        self._rows = rows

    def clear(self) -> None:
        self.coefficients = None
        self._mask = self._pooled = None
        self._rows = {}

    def _pooled_coefficients(self) -> Tensor:
        """Each row's mean coefficients over its real tokens [B, 1, E+1] (sequence routing: as set)."""
        assert self.coefficients is not None
        if self.coefficients.shape[1] == 1:
            return self.coefficients
        if self._pooled is None:  # token routing, computed once per forward and only when a pooler asks
            self._pooled = pool_hidden(self.coefficients, self._mask).unsqueeze(1)  # [B, 1, E+1]
        return self._pooled

    def scale_row(
        self, layer: MixtureLoraLinear | MixtureLoraEmbedding, extra: str | None = None, *, untokened: bool = False
    ) -> Tensor:
        """lambda w_e s_e (or (1 - lambda) s_p) for each of the layer's rank rows: [B, 1|T, R];
        with ``extra`` ("bias" / "gain"), the coefficient c_e of each such piece: [B, 1|T, P].

        ``untokened``: for an input without a token axis (a pooler's [B, D]): [B, 1, *], from each
        row's mean coefficients under token routing (computed here: such layers are few and run once).
        """
        if untokened and self.coefficients is not None and self.coefficients.shape[1] > 1:
            pooled = self._pooled_coefficients()  # [B, 1, E+1]
            if extra is None:
                return (pooled.index_select(-1, layer.rank_column) * layer.rank_scale).to(layer.A_cat.dtype)
            return pooled.index_select(-1, getattr(layer, f"{extra}_column")).to(layer.A_cat.dtype)
        key = (layer.stack_id, layer.A_cat.dtype)
        row = self._rows.get(key if extra is None else (extra, *key))
        if row is None:
            raise RuntimeError("a mixture layer ran outside its block: no routing weights were set")
        return row


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D is not None and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]  # Conv1D keeps its weight as [in, out]
    raise TypeError(f"{type(layer).__name__} is neither nn.Linear nor Conv1D")


class _StackedLora(nn.Module):
    """What both mixture layers hold: the experts' A and B stacked once, and per rank row the
    coefficient column it reads and its scaling s (``rank_column``, ``rank_scale`` [R]).

    All are buffers: frozen, moved by ``.to()``, kept out of state dicts (the experts live in their
    own files). A and B take the base weight's dtype; ``rank_scale`` stays float32.
    """

    extras: tuple[str, ...] = ()  # the piece kinds beyond A and B this layer mixes: "bias", "gain"

    def _setup(
        self,
        base_layer: nn.Module,
        pieces: Sequence[LoraPiece],
        routing: BlockRouting,
        shape: tuple[int, int],
        what: str,
    ) -> None:
        """Check that every piece fits ``shape`` (in, out) and keep the base layer and routing."""
        if not pieces:
            raise ValueError("a mixture layer needs at least one LoRA piece")
        for piece in pieces:
            if piece.A.shape[1] != shape[0] or piece.B.shape[0] != shape[1]:
                raise ValueError(
                    f"LoRA A {tuple(piece.A.shape)} / B {tuple(piece.B.shape)} do not fit {what} of {shape[0]} "
                    f"inputs and {shape[1]} outputs"
                )
        self.base_layer = base_layer
        self.routing = routing
        self.in_features, self.out_features = shape

    def _stack(self, pieces: Sequence[LoraPiece], weight: Tensor, b_blocks: Sequence[Tensor]) -> list[int]:
        """Register A_cat [R, k], B_cat [d, R] (from ``b_blocks``), rank_column, rank_scale; returns the ranks."""
        ranks = [piece.A.shape[0] for piece in pieces]
        like = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer("A_cat", torch.cat([p.A for p in pieces], 0).to(**like), persistent=False)
        self.register_buffer("B_cat", torch.cat(list(b_blocks), 1).to(**like), persistent=False)
        columns = [p.column for p, r in zip(pieces, ranks) for _ in range(r)]
        self._scales = [p.scale for p, r in zip(pieces, ranks) for _ in range(r)]  # Python floats: float32 kept
        self.register_buffer("rank_column", torch.tensor(columns, device=weight.device), persistent=False)
        self.register_buffer(
            "rank_scale", torch.tensor(self._scales, dtype=torch.float32, device=weight.device), persistent=False
        )
        self.columns = sorted({p.column for p in pieces})
        return ranks

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.rank_scale = torch.tensor(self._scales, dtype=torch.float32, device=self.A_cat.device)
        return self


class MixtureLoraLinear(_StackedLora):
    """A frozen ``nn.Linear`` or ``Conv1D`` plus a routed mixture of frozen LoRA experts.

    ``A_cat`` [R, k], ``B_cat`` [d, R] and the per-rank-row buffers as in ``_StackedLora``; with lora
    biases or DoRA experts also ``bias_rows`` / ``gain_rows`` [P, d] and their columns [P].
    """

    def __init__(self, base_layer: nn.Module, pieces: Sequence[LoraPiece], routing: BlockRouting) -> None:
        super().__init__()
        self._setup(base_layer, pieces, routing, linear_shape(base_layer), "a layer")
        weight = base_layer.weight
        # DoRA: g_e folded into its B rows (g_e B_e); plain pieces keep B_e
        b_blocks = [p.B if p.gain is None else p.gain.to(p.B.dtype).unsqueeze(1) * p.B for p in pieces]
        ranks = self._stack(pieces, weight, b_blocks)
        like = {"device": weight.device, "dtype": weight.dtype}
        biased = [p for p in pieces if p.bias is not None]
        scaled = [p for p in pieces if p.gain is not None]
        # [P, d] rows: s_e b_e of each biased piece; g_e - 1 of each DoRA piece
        self.register_buffer(
            "bias_rows",
            torch.stack([p.scale * p.bias.float() for p in biased]).to(**like) if biased else None,
            persistent=False,
        )
        self.register_buffer(
            "gain_rows",
            torch.stack([p.gain.float() - 1 for p in scaled]).to(**like) if scaled else None,
            persistent=False,
        )
        self.register_buffer(
            "bias_column",
            torch.tensor([p.column for p in biased], device=weight.device) if biased else None,
            persistent=False,
        )
        self.register_buffer(
            "gain_column",
            torch.tensor([p.column for p in scaled], device=weight.device) if scaled else None,
            persistent=False,
        )
        self.extras = ("bias",) * bool(biased) + ("gain",) * bool(scaled)
        signature = tuple((p.column, r, p.scale, p.bias is not None, p.gain is not None) for p, r in zip(pieces, ranks))
        self.stack_id = routing.add_layer(self, signature)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, k] (or a pooler's [B, k])
        if x.dim() == 2:
            return self._mix(x.unsqueeze(1), untokened=True).squeeze(1)  # [B, d]
        return self._mix(x)

    def _mix(self, x: Tensor, untokened: bool = False) -> Tensor:  # x [B, T, k]
        routing = self.routing
        y = self.base_layer(x)  # [B, T, d]  W0 x (+ base bias)
        if self.gain_rows is not None:  # DoRA: W0 x (1 + sum_e c_e (g_e - 1))
            base_bias = self.base_layer.bias
            w0x = y if base_bias is None else y - base_bias  # [B, T, d]
            y = y + w0x * (routing.scale_row(self, "gain", untokened=untokened) @ self.gain_rows)  # [B, 1|T, d]
        if self.bias_rows is not None:  # + sum_e c_e s_e b_e
            y = y + routing.scale_row(self, "bias", untokened=untokened) @ self.bias_rows  # [B, 1|T, d]
        scale_row = routing.scale_row(self, untokened=untokened)  # [B, 1|T, R]  lambda w_e s_e | (1-lambda) s_p
        h = torch.matmul(x, self.A_cat.T) * scale_row  # [B, T, R]  A_e x, weighted
        if y.is_contiguous() and h.is_contiguous():
            # y += h @ B_cat.T in place: one pass over y instead of a new [B, T, d] tensor plus an add.
            # Safe for autograd: neither the base matmul nor addmm saves its output for backward.
            y.view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), self.B_cat.T)
            return y  # [B, T, d]
        return y + torch.matmul(h, self.B_cat.T)  # [B, T, d]  + sum over experts of B_e h_e

    @property
    def is_plain_lora(self) -> bool:
        """True when the mixture under fixed weights is one plain LoRA (no lora bias, no DoRA)."""
        return self.bias_rows is None and self.gain_rows is None

    @torch.no_grad()
    def delta_weight(self, coefficients: Tensor) -> Tensor:
        """The merged update [d, k] for fixed coefficients [E+1] (lambda w_e..., 1 - lambda).

        y = W0 x + x @ delta.T equals ``forward`` under those coefficients (a plain LoRA merge) when
        ``is_plain_lora``.
        """
        coefficients = coefficients.to(device=self.rank_scale.device, dtype=torch.float32)
        row = coefficients[self.rank_column] * self.rank_scale  # [R]
        return (self.B_cat.float() * row) @ self.A_cat.float()  # [d, k]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank_rows={self.A_cat.shape[0]}"


class MixtureLoraEmbedding(_StackedLora):
    """A frozen ``nn.Embedding`` plus a routed mixture of frozen LoRA embedding experts.

    PEFT's embedding LoRA is ``embedding(ids, A.T) @ B.T * s`` with lora_embedding_A [r, vocab] and
    lora_embedding_B [dim, r] (times the base layer's ``embed_scale`` where it has one, as Gemma's);
    stacked: A_cat [R, vocab], B_cat [dim, R], the same scale row as ``MixtureLoraLinear``.
    """

    def __init__(self, base_layer: nn.Embedding, pieces: Sequence[LoraPiece], routing: BlockRouting) -> None:
        super().__init__()
        vocab, dim = base_layer.weight.shape
        self._setup(base_layer, pieces, routing, (vocab, dim), "an embedding")
        ranks = self._stack(pieces, base_layer.weight, [p.B for p in pieces])
        self.stack_id = routing.add_layer(self, ("embedding", *((p.column, r, p.scale) for p, r in zip(pieces, ranks))))

    def forward(self, ids: Tensor) -> Tensor:  # ids [B, T]
        y = self.base_layer(ids)  # [B, T, dim]
        base = self.base_layer
        h = nn.functional.embedding(ids, self.A_cat.T, padding_idx=base.padding_idx)  # [B, T, R]
        h = h * self.routing.scale_row(self)  # [B, T, R]  weighted
        delta = torch.matmul(h, self.B_cat.T)  # [B, T, dim]
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            delta = delta * torch.as_tensor(embed_scale, dtype=delta.dtype, device=delta.device)
        return y + delta

    def extra_repr(self) -> str:
        return f"vocab={self.in_features}, dim={self.out_features}, rank_rows={self.A_cat.shape[0]}"
