"""Rows routed apart, decoded together: ``request(force_rows=...)``, ``row_routing()`` and
``request(rows=...)`` (what the server's batch runs on), checked against each row alone.

Each row of a left-padded batch, some forced and some routed, must get the logits it gets alone,
at the prefill and at every decode step after rows are reordered, dropped and joined with rows of
another request; sequence and token routing, tiny Llama and GPT-2. Plus the server's text stream
(stop strings, unfinished characters) and sampling helpers.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_request_routing import cached_greedy  # noqa: E402

from atmoe import build_atmoe  # noqa: E402
from atmoe.errors import RoutingError  # noqa: E402
from atmoe.row_routing import RowRouting  # noqa: E402
from atmoe.testing import make_random_adapter, make_tiny_gpt2, make_tiny_llama  # noqa: E402

FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
FORCE = {"a": 0.7, "c": 0.3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    base = FAMILIES[request.param]()
    adapters = {n: make_random_adapter(base, r=r, seed=s) for n, r, s in (("a", 2, 1), ("b", 3, 2), ("c", 4, 3))}
    return base, adapters


def composed(family, routing: str):
    base, adapters = family
    groups = {"functional": {"a": adapters["a"], "b": adapters["b"]}, "style": {"c": adapters["c"]}}
    model = build_atmoe(copy.deepcopy(base), groups, routing=routing).eval()
    generator = torch.Generator().manual_seed(7)
    state = model.router_state_dict()
    model.load_router_state_dict(
        {
            k: v if k.startswith("router_inputs.") else torch.randn(v.shape, generator=generator)
            for k, v in state.items()
        }
    )
    return model


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_keyword(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


@torch.no_grad()
def alone(model, ids: list[int], force, steps: int) -> list[torch.Tensor]:
    """Each step's next-token logits of one row decoded by itself (greedy, generate's own loop)."""
    prompt = torch.tensor([ids])
    with model.forced_routing(force) if force else nullcontext():
        _, logits = cached_greedy(model, prompt, torch.ones_like(prompt), steps)  # [steps, 1, V]
    return list(logits[:, 0])


def left_pad(prompts: list[list[int]]):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def prefill(model, prompts, forces):
    ids, mask = left_pad(prompts)
    with model.request(attention_mask=mask, force_rows=forces):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        rows = model.row_routing()
    return out["logits"][:, -1].float(), cache_of(out), mask, rows


@torch.no_grad()
def decode(model, tokens, mask, cache, rows, next_positions):
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    with model.request(rows=rows):
        out = model(
            input_ids=tokens.view(-1, 1),
            attention_mask=mask,
            position_ids=next_positions.view(-1, 1),
            use_cache=True,
            **{cache_keyword(model): cache},
        )
    return out["logits"][:, -1].float(), cache_of(out), mask


def rebuild(cache, keep=None, pad=0):
    """The cache of rows ``keep``, left-padded by ``pad`` columns (as the server re-aligns rows)."""
    from transformers.cache_utils import DynamicCache

    pairs = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if keep is not None:
            k, v = k[keep], v[keep]
        if pad:
            k = torch.cat([k.new_zeros(*k.shape[:2], pad, k.shape[3]), k], 2)
            v = torch.cat([v.new_zeros(*v.shape[:2], pad, v.shape[3]), v], 2)
        pairs.append((k, v))
    return DynamicCache(ddp_cache_data=pairs)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_rows_forced_and_routed_in_one_batch_each_decode_as_they_would_alone(family, routing):
    model = composed(family, routing)
    prompts = [[5, 9, 17, 33], [7, 8, 9, 10, 11, 12], [3, 4]]
    forces = [None, FORCE, None]
    steps = 4
    expected = [alone(model, p, f, steps) for p, f in zip(prompts, forces)]
    logits, cache, mask, rows = prefill(model, prompts, forces)
    assert rows.batch_size == 3 and rows.is_forced.tolist() == [False, True, False]
    next_positions = torch.tensor([len(p) for p in prompts])
    for step in range(steps):
        for row in range(len(expected)):
            torch.testing.assert_close(logits[row], expected[row][step], atol=1e-4, rtol=1e-4)
        tokens = torch.stack([expected[row][step].argmax() for row in range(len(expected))])
        if step == 1:  # the middle row leaves; the other two swap places
            keep = torch.tensor([2, 0])
            cache, mask, rows = rebuild(cache, keep), mask[keep], rows.select(keep)
            tokens, next_positions = tokens[keep], next_positions[keep]
            expected = [expected[2], expected[0]]
        logits, cache, mask = decode(model, tokens, mask, cache, rows, next_positions)
        next_positions = next_positions + 1
        if step == 1:
            assert logits.shape[0] == 2


@torch.no_grad()
def test_rows_of_two_requests_join_one_batch(family):
    model = composed(family, "sequence")
    first, second = [[5, 9, 17, 33, 40, 41]], [[7, 8], [12, 13, 14]]
    expected = [alone(model, p, f, 3) for p, f in ((first[0], None), (second[0], FORCE), (second[1], None))]
    logits_a, cache_a, mask_a, rows_a = prefill(model, first, [None])
    logits_b, cache_b, mask_b, rows_b = prefill(model, second, [FORCE, None])
    pad = mask_a.shape[1] - mask_b.shape[1]
    from transformers.cache_utils import DynamicCache

    joined = DynamicCache(
        ddp_cache_data=[
            (torch.cat([a.keys, b.keys], 0), torch.cat([a.values, b.values], 0))
            for a, b in zip(cache_a.layers, rebuild(cache_b, pad=pad).layers)
        ]
    )
    mask = torch.cat([mask_a, torch.cat([mask_b.new_zeros(2, pad), mask_b], 1)], 0)
    rows = RowRouting.cat([rows_a, rows_b])
    tokens = torch.cat([logits_a.argmax(-1), logits_b.argmax(-1)])
    logits, _, _ = decode(model, tokens, mask, joined, rows, torch.tensor([6, 2, 3]))
    for row in range(3):
        torch.testing.assert_close(logits[row], expected[row][1], atol=1e-4, rtol=1e-4)
    report = rows.row_report(1, model.group_names, model.expert_names)
    assert report[0]["experts"] == pytest.approx({"a": 0.7, "b": 0.0, "c": 0.3})
    assert report[0]["groups"] == pytest.approx({"functional": 0.7, "style": 0.3})


def test_force_rows_are_checked_like_forced_routing(family):
    model = composed(family, "sequence")
    ids, mask = left_pad([[5, 6], [7, 8]])
    with pytest.raises(RoutingError, match="unknown expert 'z'"), model.request(force_rows=[None, {"z": 1.0}]):
        pass
    with pytest.raises(RoutingError, match=">= 0"):
        model.check_forced({"a": -0.5})
    with pytest.raises(RoutingError, match="rows"), torch.no_grad(), model.request(force_rows=[None]):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RoutingError, match="inside model.request"):
        model.row_routing()


# -- the server's text and sampling helpers -------------------------------------------------------------


class Letters:
    """A tokenizer whose token i decodes to chr(i): exact control over the text of each token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    from atmoe.serve.text import TextStream

    stream = TextStream(Letters(), stop=["END"])
    sent = [stream.push(ord(c)) for c in "abE"]
    assert sent == ["a", "b", ""]  # "E" may start "END"
    assert stream.push(ord("x")) == "Ex"  # it did not
    assert [stream.push(ord(c)) for c in "EN"] == ["", ""]
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.sent == "abEx"
    plain = TextStream(Letters(), stop=["zz"])
    assert [plain.push(ord(c)) for c in "az"] == ["a", ""] and plain.finish() == "z"


def test_text_stream_waits_for_whole_characters():
    from atmoe.serve.text import TextStream

    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    assert [stream.push(b) for b in "é!".encode()] == ["", "é", "!"]


def test_nucleus_keeps_the_smallest_set_reaching_top_p_and_greedy_rows_take_the_argmax():
    from atmoe.serve.sampling import RowSampler, next_tokens, nucleus_probabilities

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = nucleus_probabilities(logits, 1.0, 0.75)
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert nucleus_probabilities(logits, 1.0, 0.01).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(nucleus_probabilities(logits * 1e30, 1e-30, 1.0)).all()
    samplers = [
        RowSampler.create(temperature=0, top_p=1, seed=None),
        RowSampler.create(temperature=1, top_p=0.5, seed=3),
    ]
    batch = torch.stack([logits.flip(0), logits])
    assert next_tokens(batch, samplers).tolist() == [3, 0]
    again = [RowSampler.create(temperature=1.0, top_p=1.0, seed=9) for _ in range(2)]
    first = [int(next_tokens(logits.view(1, -1), [again[0]])[0]) for _ in range(20)]
    second = [int(next_tokens(logits.view(1, -1), [again[1]])[0]) for _ in range(20)]
    assert first == second
