"""The demo's group layouts: partitions of the suite's experts, renamed intents, and routing accuracy
scored with the suite's groups whatever groups a model routes with."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from atmoe.demo import tasks
from atmoe.demo.layouts import LAYOUTS, make_layout

SUITE = tasks.DEFAULT_SUITE.groups  # functional 3, domain 3, style 2
KIND = {name: group for group, names in SUITE.items() for name in names}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_partitions_the_suite_experts_under_its_own_names(name):
    layout = make_layout(name, SUITE)
    members = [e for names in layout.groups.values() for e in names]
    assert sorted(layout.source[e] for e in members) == sorted(KIND)  # each suite expert exactly once
    assert len(set(members)) == len(members) and not set(members) & set(KIND)  # new names only
    shape = {"one_group": (1, 8), "solo_groups": (8, 1), "mixed_groups": (3, 3)}[name]
    assert (layout.n_groups, layout.n_max) == shape


def test_mixed_groups_keep_the_suite_sizes_but_mix_the_kinds():
    layout = make_layout("mixed_groups", SUITE)
    assert sorted(len(v) for v in layout.groups.values()) == sorted(len(v) for v in SUITE.values())
    for names in layout.groups.values():
        assert len({KIND[layout.source[e]] for e in names}) >= 2


def test_rename_maps_intents_and_leaves_the_example_alone():
    layout = make_layout("one_group", SUITE)
    example = tasks.make_example(["a", "b", "c"], "count", "animal", "loud")
    renamed = layout.rename(example)
    assert renamed["intents"] == ["count-one", "animal-one", "loud-one"]
    assert (renamed["prompt"], renamed["response"]) == (example["prompt"], example["response"])
    assert example["intents"] == ["count", "animal", "loud"]


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        make_layout("two_groups", SUITE)


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *words]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, one PEFT adapter per suite expert, and composite examples with intents."""
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("layouts")
    tokenizer = _tokenizer(tasks.vocabulary_words())
    base = make_tiny_llama(vocab=len(tokenizer), seed=3).eval()
    paths = {name: make_peft_adapter(base, root / name, r=4, seed=40 + i) for i, name in enumerate(KIND)}
    rng = random.Random(0)
    combos = tasks.composite_intents(tasks.DEFAULT_SUITE)
    examples = [tasks.make_example(rng.sample(tasks.LETTERS, 4), *rng.choice(combos)) for _ in range(40)]
    return base, tokenizer, paths, examples


def _randomise_routers(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 2.0)


def test_routing_accuracy_is_the_toolkits_with_the_models_own_groups(tiny):
    from atmoe import build_atmoe
    from atmoe.data import parse_example
    from atmoe.demo.evaluate import routing_accuracy
    from atmoe.training import evaluate

    base, tokenizer, paths, examples = tiny
    model = build_atmoe(copy.deepcopy(base), {g: {n: paths[n] for n in names} for g, names in SUITE.items()})
    _randomise_routers(model, 0)
    ours = routing_accuracy(model, tokenizer, examples)
    toolkit = evaluate(model, tokenizer, [parse_example(ex) for ex in examples], batch_size=16, max_length=128)
    assert ours == toolkit["routing_accuracy"]
    assert routing_accuracy(model, tokenizer, examples, KIND) == ours  # the suite's groups are the model's here
    assert 0.0 < ours < 1.0  # random routers: some hits, some misses, so the comparison means something


def test_routing_accuracy_scores_a_layout_with_the_suite_groups(tiny):
    from atmoe import build_atmoe
    from atmoe.demo.evaluate import routing_accuracy

    base, tokenizer, paths, examples = tiny
    layout = make_layout("solo_groups", SUITE)
    model = build_atmoe(
        copy.deepcopy(base), {g: {n: paths[layout.source[n]] for n in names} for g, names in layout.groups.items()}
    )
    intended = examples[0]["intents"]
    # forced weights on the intended experts: every intended expert tops its suite group
    with model.forced_routing({f"{n}-solo": 1.0 for n in intended}):
        assert routing_accuracy(model, tokenizer, examples[:1], KIND, names=layout.source) == 1.0
    # forced on a wrong expert of the functional group: a miss, although each solo group has one expert
    wrong = next(n for n in SUITE["functional"] if n != intended[0])
    with model.forced_routing({f"{wrong}-solo": 1.0, f"{intended[1]}-solo": 1.0, f"{intended[2]}-solo": 1.0}):
        assert routing_accuracy(model, tokenizer, examples[:1], KIND, names=layout.source) == 0.0
