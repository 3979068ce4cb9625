"""MixtureLoraLinear against the formula computed naively, expert by expert."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from atmoe.layer import BlockRouting, LoraPiece, MixtureLoraLinear

IN, OUT = 12, 10


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def make_base(kind: str, generator) -> nn.Module:
    if kind == "linear":
        base = nn.Linear(IN, OUT)
    else:
        base = Conv1D(OUT, IN)  # weight [IN, OUT]
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return base


def make_pieces(generator, ranks, scales, columns):
    return [
        LoraPiece(
            column=c, A=torch.randn(r, IN, generator=generator), B=torch.randn(OUT, r, generator=generator), scale=s
        )
        for r, s, c in zip(ranks, scales, columns)
    ]


def naive(base, pieces, coefficients, x):
    """y = W0 x + sum over pieces of coefficient[column] * s * B A x, one piece at a time."""
    y = base(x)
    for piece in pieces:
        c = coefficients[..., piece.column : piece.column + 1]  # [B, 1|T, 1]
        y = y + c * piece.scale * (x @ piece.A.T @ piece.B.T)
    return y


def coefficients_for(weights, lam):
    """[.., E] weights -> [.., E+1] coefficients (lambda w_e, then 1 - lambda)."""
    general = torch.full((*weights.shape[:-1], 1), 1.0 - lam)
    return torch.cat([lam * weights, general], -1)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("per_token", [False, True])
def test_mixture_matches_naive_loop(kind, per_token, generator):
    base = make_base(kind, generator)
    # three experts of different ranks and scalings; expert 1 does not adapt this layer
    pieces = make_pieces(generator, ranks=[4, 2, 3], scales=[2.0, 0.5, 8 / 3**0.5], columns=[0, 2, 3])
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, pieces, routing)
    x = torch.randn(3, 5, IN, generator=generator)
    shape = (3, 5, 4) if per_token else (3, 1, 4)
    weights = torch.softmax(torch.randn(shape, generator=generator), -1)
    coefficients = coefficients_for(weights, lam=1.0)
    routing.set(coefficients)
    torch.testing.assert_close(layer(x), naive(base, pieces, coefficients, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_absent_expert_contributes_nothing(kind, generator):
    base = make_base(kind, generator)
    pieces = make_pieces(generator, ranks=[3, 5], scales=[1.0, 2.0], columns=[0, 2])
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, pieces, routing)
    x = torch.randn(2, 4, IN, generator=generator)
    only_absent = torch.tensor([0.0, 1.0, 0.0]).expand(2, 1, 3)  # all weight on expert 1, absent here
    routing.set(coefficients_for(only_absent, lam=1.0))
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_general_expert_gets_one_minus_lambda(kind, generator):
    base = make_base(kind, generator)
    experts = make_pieces(generator, ranks=[2, 4], scales=[2.0, 1.0], columns=[0, 1])
    general = make_pieces(generator, ranks=[6], scales=[0.75], columns=[2])[0]  # column E = 2
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, experts + [general], routing)
    x = torch.randn(2, 3, IN, generator=generator)
    weights = torch.tensor([[[0.3, 0.7]], [[1.0, 0.0]]])
    lam = 0.25
    routing.set(coefficients_for(weights, lam))
    expected = base(x)
    for piece, w in zip(experts, weights.unbind(-1)):
        expected = expected + lam * w[..., None] * piece.scale * (x @ piece.A.T @ piece.B.T)
    expected = expected + (1 - lam) * general.scale * (x @ general.A.T @ general.B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_equals_unmerged(kind, generator):
    base = make_base(kind, generator)
    pieces = make_pieces(generator, ranks=[1, 4, 2], scales=[4.0, 0.5, 1.5], columns=[0, 1, 3])
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, pieces, routing)
    coefficients = torch.tensor([0.2, 0.5, 0.0, 0.3])  # E = 3, lambda = 1: column 3 unused... but set
    routing.set(coefficients.view(1, 1, -1))
    x = torch.randn(2, 6, IN, generator=generator)
    delta = layer.delta_weight(coefficients)  # [OUT, IN]
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    # merging into the base weight itself gives the same layer
    merged = make_base(kind, torch.Generator().manual_seed(0))
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        merged.weight += delta if kind == "linear" else delta.T
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


def test_buffers_are_frozen_move_with_dtype_and_stay_out_of_state_dict(generator):
    base = make_base("linear", generator)
    layer = MixtureLoraLinear(base, make_pieces(generator, [2, 3], [1.0, 1.0], [0, 1]), BlockRouting())
    assert [name for name, _ in layer.named_parameters()] == ["base_layer.weight", "base_layer.bias"]
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias"}
    assert layer.A_cat.shape == (5, IN) and layer.B_cat.shape == (OUT, 5)
    assert layer.rank_column.tolist() == [0, 0, 1, 1, 1]
    layer.to(torch.float64)
    assert layer.A_cat.dtype == torch.float64 and layer.rank_scale.dtype == torch.float32
    layer.routing.set(torch.tensor([[[0.5, 0.5, 0.0]]]))
    assert layer(torch.randn(1, 2, IN, dtype=torch.float64)).dtype == torch.float64


def test_bfloat16_base_keeps_its_dtype(generator):
    base = make_base("linear", generator).to(torch.bfloat16)
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, make_pieces(generator, [2], [1.0], [0]), routing)
    assert layer.A_cat.dtype == torch.bfloat16
    routing.set(torch.tensor([[[1.0, 0.0]]]))
    assert layer(torch.randn(1, 3, IN).to(torch.bfloat16)).dtype == torch.bfloat16


def test_rejects_pieces_that_do_not_fit(generator):
    base = make_base("linear", generator)
    bad = LoraPiece(column=0, A=torch.randn(2, IN + 1), B=torch.randn(OUT, 2), scale=1.0)
    with pytest.raises(ValueError):
        MixtureLoraLinear(base, [bad], BlockRouting())


def test_never_builds_a_tokens_by_experts_by_out_tensor(generator):
    """The largest intermediate is [B, T, R] or the output [B, T, d], whatever E is."""
    base = make_base("linear", generator)
    pieces = make_pieces(generator, ranks=[1] * 16, scales=[1.0] * 16, columns=list(range(16)))
    routing = BlockRouting()
    layer = MixtureLoraLinear(base, pieces, routing)
    routing.set(torch.full((2, 1, 17), 1 / 16))
    x = torch.randn(2, 7, IN, generator=generator)
    biggest = []

    def record(t):
        biggest.append(t.numel())
        return t

    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                record(out)
            return out

    with Sizes():
        layer(x)
    assert max(biggest) <= 2 * 7 * max(OUT, 16)
