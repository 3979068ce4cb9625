"""The demo's task suite (pure Python): answers, splits, and what the base model is shown."""

from __future__ import annotations

import random

import pytest

from atmoe.demo import tasks


def test_a_composite_answer_has_one_field_per_group():
    ex = tasks.make_example(["c", "a", "b"], "count", "animal", "loud")
    assert ex["prompt"] == "instruction: count animal loud input: c a b output:"
    assert ex["response"] == "hey | cat ant bee | three"
    assert ex["intents"] == ["count", "animal", "loud"]


@pytest.mark.parametrize(
    ("function", "letters", "word"),
    [
        ("count", "cab", "three"),
        ("parity", "cab", "odd"),
        ("parity", "cabd", "even"),
        ("vowel", "cdb", "no"),
        ("vowel", "cdeb", "yes"),
        ("vowel", "acd", "yes"),
    ],
)
def test_functional_intents_compute_a_word(function, letters, word):
    assert tasks.answer(list(letters), function, "same", "plain")[-1] == word


def test_single_intent_examples_keep_the_other_fields_neutral():
    ex = tasks.make_example(["d", "f"], "copy", "fruit", "plain")
    assert ex["response"] == "- | date fig | -"
    assert ex["intents"] == ["fruit"]
    assert tasks.make_example(["d"], "copy", "same", "plain")["intents"] == []


def test_splits_keep_held_out_inputs_unseen():
    splits = tasks.build_splits(tasks.QUICK_SUITE, n_expert=50, n_router=60, n_router_eval=12, n_test=30)

    def inputs(examples):
        return {ex["prompt"].split("input:")[1] for ex in examples}

    seen = inputs(splits.router_train) | inputs(splits.router_eval)
    for data in splits.expert_train.values():
        seen |= inputs(data)
    assert not inputs(splits.test) & seen
    assert all(len(ex["intents"]) == 3 for ex in splits.test)
    triples = {tuple(ex["intents"]) for ex in splits.router_train}
    assert triples == set(tasks.composite_intents(tasks.QUICK_SUITE))
    for name, data in splits.expert_train.items():
        assert all(ex["intents"] == [name] for ex in data)


def test_the_base_model_never_sees_an_expert_skill():
    lines = tasks.generic_text(random.Random(0), 400, tasks.DEFAULT_SUITE)
    echoes = [line for line in lines if line.startswith("instruction:") and " input: " in line and " output: " in line]
    assert echoes
    for line in echoes:
        answer = line.split("output: ")[1].split()
        assert answer[0] == tasks.EMPTY and answer[-1] == tasks.EMPTY  # tone and function fields neutral
        assert answer[2:-2] == line.split("input: ")[1].split(" output:")[0].split()  # content echoed as is


def test_every_suite_word_is_in_the_vocabulary():
    vocabulary = set(tasks.vocabulary_words())
    splits = tasks.build_splits(tasks.DEFAULT_SUITE, n_expert=20, n_router=30, n_router_eval=6, n_test=10)
    for ex in [*splits.router_train, *splits.test]:
        assert set((ex["prompt"] + " " + ex["response"]).split()) <= vocabulary


def test_a_suite_refuses_unknown_intents():
    with pytest.raises(ValueError, match="unknown functional intents"):
        tasks.SuiteSpec(functional=("reverse",))
