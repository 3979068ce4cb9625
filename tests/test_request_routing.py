"""Routing is owned by the request: forward routes every call, generate holds the prompt's routing.

Each path is checked against a reference that needs no KV cache and no request state: a greedy loop
of full forwards, each routed on the prompt tokens alone (``routing_mask``), which is what a held
sequence routing means; for token routing a causal model's per-token routing is the same with or
without a cache. Free (randomised) routers, forced routing, sequence and token routing, left and
right padding, batches of two, and the KV cache are all covered, on tiny Llama and GPT-2.
"""

from __future__ import annotations

import copy

import pytest
import torch

from atmoe import build_atmoe
from atmoe.errors import RoutingError
from atmoe.layer import MixtureLoraLinear
from atmoe.testing import make_random_adapter, make_tiny_bert, make_tiny_gpt2, make_tiny_llama

FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
STEPS = 5


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    base = FAMILIES[request.param]()
    adapters = {
        name: make_random_adapter(base, r=r, seed=seed) for name, r, seed in (("a", 2, 1), ("b", 3, 2), ("c", 4, 3))
    }
    return request.param, base, adapters


def composed(family, **kwargs):
    _, base, adapters = family
    groups = {"functional": {"a": adapters["a"], "b": adapters["b"]}, "style": {"c": adapters["c"]}}
    model = build_atmoe(copy.deepcopy(base), groups, **kwargs).eval()
    generator = torch.Generator().manual_seed(7)
    state = {
        k: torch.randn(v.shape, generator=generator)
        for k, v in model.router_state_dict().items()
        if not k.startswith("router_inputs.")
    }
    model.load_router_state_dict(
        state | {k: v for k, v in model.router_state_dict().items() if k.startswith("router_inputs.")}
    )
    return model


def left_padded_batch():
    """Two prompts of different lengths, left-padded: ids [2, 6], mask [2, 6]."""
    ids = torch.tensor([[0, 0, 5, 9, 17, 33], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def reference_greedy(model, ids, mask, steps=STEPS):
    """Greedy decoding by full forwards without a cache, routed on the prompt tokens only each step.

    Returns (tokens [B, T + steps], logits per step [steps, B, V]).
    """
    prompt_mask = mask.clone()
    logits_per_step = []
    for _ in range(steps):
        routing_mask = torch.cat(
            [prompt_mask, prompt_mask.new_zeros(ids.shape[0], ids.shape[1] - prompt_mask.shape[1])], 1
        )
        out = model(input_ids=ids, attention_mask=mask, routing_mask=routing_mask, position_ids=positions(mask))
        step_logits = out.logits[:, -1].float()
        logits_per_step.append(step_logits)
        next_token = step_logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids, torch.stack(logits_per_step)


@torch.no_grad()
def cached_greedy(model, ids, mask, steps=STEPS):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack([step.float() for step in out.logits])


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_generate_with_a_kv_cache_equals_the_cache_free_reference(family, routing):
    model = composed(family, routing=routing)
    ids, mask = left_padded_batch()
    if routing == "sequence":
        expected_tokens, expected_logits = reference_greedy(model, ids, mask)
    else:  # token routing: each token routes on its own hidden state, cached or not
        expected_tokens, expected_logits = _token_reference(model, ids, mask)
    tokens, logits = cached_greedy(model, ids, mask)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)


@torch.no_grad()
def _token_reference(model, ids, mask, steps=STEPS):
    logits_per_step = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        logits_per_step.append(out.logits[:, -1].float())
        ids = torch.cat([ids, logits_per_step[-1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids, torch.stack(logits_per_step)


@torch.no_grad()
def test_generate_holds_the_prompts_routing_and_each_row_keeps_its_own(family):
    model = composed(family)
    ids, mask = left_padded_batch()
    model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    prompt = [weights.clone() for _, weights in model.last_routing_tensors()]
    assert not torch.allclose(prompt[0][0], prompt[0][1], atol=1e-3)  # rows routed apart
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    for held, (_, weights) in zip(prompt, model.last_routing_tensors()):
        torch.testing.assert_close(weights, held)
    # a padded row routes as it does alone (padding left out of the pool)
    model(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:])
    torch.testing.assert_close(model.last_routing_tensors()[0][1][0], prompt[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_sequence_routing_pools_over_the_real_tokens_only(family, side):
    model = composed(family)
    short, other = torch.tensor([[5, 9, 17]]), torch.tensor([[7, 8, 9, 10, 11]])
    pad = torch.zeros(1, 2, dtype=torch.long)
    row = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    row_mask = torch.tensor([[0, 0, 1, 1, 1]]) if side == "left" else torch.tensor([[1, 1, 1, 0, 0]])
    ids, mask = torch.cat([row, other]), torch.cat([row_mask, torch.ones(1, 5, dtype=torch.long)])
    model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    batched = [weights for _, weights in model.last_routing_tensors()]
    model(input_ids=short)
    alone = [weights for _, weights in model.last_routing_tensors()]
    model(input_ids=other)
    other_alone = [weights for _, weights in model.last_routing_tensors()]
    for got, first, second in zip(batched, alone, other_alone):
        torch.testing.assert_close(got[0], first[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], second[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forced_routing_is_held_through_generate_and_equals_forced_forwards(family):
    model = composed(family)
    ids, mask = left_padded_batch()
    with model.forced_routing({"a": 0.7, "c": 0.3}):
        expected, expected_logits = _token_reference(model, ids, mask)  # forced: no state to hold
        tokens, logits = cached_greedy(model, ids, mask)
        assert model.last_routing()[0]["experts"] == pytest.approx({"a": 0.7, "b": 0.0, "c": 0.3})
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, expected)


@torch.no_grad()
def test_plain_forwards_route_every_call_and_a_request_holds(family):
    """A hand-written decode loop: plain forwards with the cache re-route on the new token; the same
    loop inside ``model.request`` keeps the prompt's routing and matches ``generate``."""
    model = composed(family)
    ids, mask = left_padded_batch()

    def loop():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        full_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        out = model(
            input_ids=step,
            attention_mask=full_mask,
            past_key_values=out.past_key_values,
            position_ids=positions(full_mask)[:, -1:],
            use_cache=True,
        )
        return out.logits[:, -1].float()

    free = loop()
    with model.request(attention_mask=mask):
        held = loop()
        with pytest.raises(RoutingError, match="do not nest"):
            with model.request(attention_mask=mask):
                pass
    expected = reference_greedy(model, ids, mask, steps=2)[1][1]
    torch.testing.assert_close(held, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(free, expected, atol=1e-4)


def test_a_mask_that_does_not_fit_the_input_is_refused(family):
    model = composed(family)
    ids, mask = left_padded_batch()
    with pytest.raises(RoutingError, match="routing mask"):
        model(input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(RoutingError, match="routing mask"):
        model(input_ids=ids, attention_mask=mask[:1])


@torch.no_grad()
def test_calibration_is_its_own_context_and_observes_only_inside_it(family):
    model = composed(family)
    ids, mask = left_padded_batch()
    hidden = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # sequence routing calibrates on each row's pooled real tokens (block 0's input: hidden_states[0])
    pooled = (hidden[0] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]
    with model.calibrating_router_inputs():
        model(input_ids=ids[1:], attention_mask=mask[1:])
    torch.testing.assert_close(model.router_inputs[0].shift, pooled[1], atol=1e-5, rtol=1e-4)
    model(input_ids=ids, attention_mask=mask)  # outside the context nothing is observed
    torch.testing.assert_close(model.router_inputs[0].shift, pooled[1], atol=1e-5, rtol=1e-4)
    with model.calibrating_router_inputs():  # a new context starts from nothing
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model.router_inputs[0].shift, pooled.mean(0), atol=1e-5, rtol=1e-4)


def test_scale_rows_are_cached_per_model_not_per_process():
    """Stack ids are the model's own: every build numbers its stacks from 0, however many came before."""
    base = make_tiny_bert()
    adapter = make_random_adapter(base, r=2, target_modules=["query", "value"], seed=1)
    ids = []
    for _ in range(3):
        model = build_atmoe(copy.deepcopy(base), {"g": {"x": adapter}})
        ids.append(sorted({m.stack_id for m in model.modules() if isinstance(m, MixtureLoraLinear)}))
    assert ids == [[0], [0], [0]]
    import atmoe.layer

    assert not any(isinstance(v, dict) for k, v in vars(atmoe.layer).items() if k.isupper())


@torch.no_grad()
def test_beam_search_expands_the_prompt_mask_with_the_batch(family):
    model = composed(family)
    ids, mask = left_padded_batch()
    model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    prompt = model.last_routing_tensors()[0][1]  # [2, E]
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    beams = model.last_routing_tensors()[0][1]  # [4, E]
    torch.testing.assert_close(beams, prompt.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)
