"""Properties of the routing math (atmoe.routing): weights are a distribution over real experts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atmoe.routing import expert_weights, flat_weights, group_totals, grouped_weights, pool_hidden

# per test, not a global profile: other test modules keep their own hypothesis settings
quick = settings(max_examples=60, deadline=None)


@st.composite
def compositions(draw):
    """Group sizes, a batch of logits for them, and the matching slot layout."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    n_groups, n_max = len(sizes), max(sizes)
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 20.0))
    generator = torch.Generator().manual_seed(seed)
    group_logits = torch.randn(batch, n_groups, generator=generator) * scale
    inside_logits = torch.randn(batch, n_groups, n_max, generator=generator) * scale
    slot_mask = torch.zeros(n_groups, n_max, dtype=torch.bool)
    expert_group, expert_slot = [], []
    for g, size in enumerate(sizes):
        slot_mask[g, :size] = True
        expert_group += [g] * size
        expert_slot += list(range(size))
    return group_logits, inside_logits, slot_mask, torch.tensor(expert_group), torch.tensor(expert_slot)


temperatures = st.floats(0.05, 50.0)


@quick
@given(compositions(), temperatures)
def test_expert_weights_are_a_distribution(comp, temperature):
    group_logits, inside_logits, slot_mask, expert_group, expert_slot = comp
    group_w, inside_w = grouped_weights(group_logits, inside_logits, slot_mask, temperature)
    weights = expert_weights(group_w, inside_w, expert_group, expert_slot)
    assert weights.shape == (group_logits.shape[0], expert_group.shape[0])
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_w.sum(-1), torch.ones(weights.shape[0]), atol=1e-5, rtol=0)
    # each group's experts add up to that group's weight
    torch.testing.assert_close(group_totals(weights, expert_group, slot_mask.shape[0]), group_w, atol=1e-5, rtol=0)


@quick
@given(compositions(), temperatures)
def test_padding_slots_get_exactly_zero(comp, temperature):
    group_logits, inside_logits, slot_mask, _, _ = comp
    _, inside_w = grouped_weights(group_logits, inside_logits, slot_mask, temperature)
    assert (inside_w[:, ~slot_mask] == 0).all()
    torch.testing.assert_close(inside_w.sum(-1), torch.ones(inside_w.shape[:-1]), atol=1e-5, rtol=0)


@quick
@given(compositions())
def test_temperature_near_zero_is_argmax(comp):
    group_logits, inside_logits, slot_mask, expert_group, expert_slot = comp
    group_w, inside_w = grouped_weights(group_logits, inside_logits, slot_mask, 1e-6)
    weights = expert_weights(group_w, inside_w, expert_group, expert_slot)
    # the expert of the best group and its best real slot (random logits: ties have probability 0)
    best_group = group_logits.argmax(-1)
    masked = inside_logits.masked_fill(~slot_mask, float("-inf"))
    best_slot = masked[torch.arange(len(best_group)), best_group].argmax(-1)
    for row in range(weights.shape[0]):
        target = ((expert_group == best_group[row]) & (expert_slot == best_slot[row])).nonzero().item()
        expected = torch.zeros(weights.shape[1])
        expected[target] = 1.0
        torch.testing.assert_close(weights[row], expected, atol=1e-4, rtol=0)


@quick
@given(compositions())
def test_large_temperature_is_even_over_real_experts(comp):
    group_logits, inside_logits, slot_mask, expert_group, expert_slot = comp
    group_w, inside_w = grouped_weights(group_logits, inside_logits, slot_mask, 1e7)
    weights = expert_weights(group_w, inside_w, expert_group, expert_slot)
    sizes = slot_mask.sum(-1).float()  # [N_G]
    expected = 1.0 / (slot_mask.shape[0] * sizes[expert_group])  # even over groups, then within
    torch.testing.assert_close(weights, expected.expand_as(weights), atol=1e-4, rtol=0)


@quick
@given(st.integers(1, 8), st.integers(1, 3), st.integers(0, 2**31 - 1), temperatures)
def test_flat_weights_are_a_distribution(n_experts, batch, seed, temperature):
    logits = torch.randn(batch, n_experts, generator=torch.Generator().manual_seed(seed)) * 5
    weights = flat_weights(logits, temperature)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch), atol=1e-5, rtol=0)
    sharp = flat_weights(logits, 1e-6)
    torch.testing.assert_close(
        sharp, torch.nn.functional.one_hot(logits.argmax(-1), n_experts).float(), atol=1e-4, rtol=0
    )
    even = flat_weights(logits, 1e7)
    torch.testing.assert_close(even, torch.full_like(even, 1.0 / n_experts), atol=1e-4, rtol=0)


def test_token_shaped_logits_keep_their_shape():
    group_logits = torch.randn(2, 5, 3)  # [B, T, N_G]
    inside_logits = torch.randn(2, 5, 3, 2)  # [B, T, N_G, N_M]
    slot_mask = torch.tensor([[True, True], [True, False], [True, True]])
    group_w, inside_w = grouped_weights(group_logits, inside_logits, slot_mask, 1.0)
    weights = expert_weights(group_w, inside_w, torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 0, 0, 1]))
    assert weights.shape == (2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))


@quick
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pool_hidden_ignores_padding(batch, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, 4, generator=generator)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    mask = (torch.arange(tokens) >= tokens - lengths[:, None]).long()  # left padding
    pooled = pool_hidden(hidden, mask)
    for row in range(batch):
        torch.testing.assert_close(pooled[row], hidden[row, tokens - lengths[row] :].mean(0))
    # whatever (finite) values the padding holds do not matter
    noisy = hidden + (1 - mask)[..., None] * 1e3
    torch.testing.assert_close(pool_hidden(noisy, mask), pooled, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pool_hidden(hidden, None), hidden.mean(1))
