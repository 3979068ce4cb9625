"""The demo report's comparisons between methods: a gap inside the router runs' spread is a tie."""

from __future__ import annotations

from statistics import fmean

from atmoe.demo.report import _compare


def _report(ours: list[float], other: list[float]) -> dict:
    return {
        "methods": {
            "atmoe": {"eval_loss": fmean(ours)},
            "flat_router": {"eval_loss": fmean(other)},
            "uniform_mixture": {"eval_loss": 5.0},
        },
        "method_details": {"atmoe": {"eval_loss_per_seed": ours}, "flat_router": {"eval_loss_per_seed": other}},
    }


def test_a_gap_inside_the_spread_of_the_runs_is_a_tie():
    text = _compare(_report([0.50, 0.53], [0.52, 0.52]), "atmoe", "flat_router")
    assert text.startswith("a tie") and "0.0300" in text


def test_a_gap_beyond_the_spread_answers_yes_or_no():
    assert _compare(_report([0.40, 0.41], [0.50, 0.51]), "atmoe", "flat_router").startswith("yes")
    assert _compare(_report([0.50, 0.51], [0.40, 0.41]), "atmoe", "flat_router").startswith("no")


def test_one_run_per_method_says_a_small_gap_is_not_evidence():
    text = _compare(_report([0.50], [0.51]), "atmoe", "flat_router")
    assert text.startswith("yes") and "not evidence" in text
    # a method without router runs (the uniform mixture) gets no such note
    assert "not evidence" not in _compare(_report([0.50], [0.51]), "atmoe", "uniform_mixture")


def _layouts(ours: list[float], one: list[float], mixed: list[float], solo: list[float]) -> dict:
    shapes = {"intent_groups": (3, 3), "one_group": (1, 8), "mixed_groups": (3, 3), "solo_groups": (8, 1)}
    runs = {"intent_groups": ours, "one_group": one, "mixed_groups": mixed, "solo_groups": solo}
    return {
        k: {
            "eval_loss": fmean(v),
            "eval_loss_per_seed": v,
            "n_groups": shapes[k][0],
            "n_max": shapes[k][1],
            "accuracy": 0.5,
            "routing_accuracy": 0.9,
            "groups": {"g": ["e"] * 8}
            if k == "one_group"
            else {
                "functional": ["count", "parity", "vowel"],
                "domain": ["animal", "color", "fruit"],
                "style": ["loud", "curious"],
            },
        }
        for k, v in runs.items()
    }


def test_the_layout_answer_compares_each_layout_with_the_suite_groups_by_the_spread_rule():
    from atmoe.demo.report import _layout_answer

    report = {"group_layouts": _layouts([0.37, 0.36], [0.55, 0.54], [0.36, 0.38], [0.49, 0.50])}
    text = _layout_answer(report)
    assert "8 experts" in text and "1 x 8 one group of all experts 0.5450 (do the suite's groups beat it? yes" in text
    assert "3 x 3 kinds mixed in each group 0.3700 (do the suite's groups beat it? a tie" in text
    assert text.endswith("See 'Group layouts' for what each layout lets the intents teach.")
    assert "Not measured" in _layout_answer({"group_layouts": {}})


def test_the_plain_moe_answer_says_what_grouping_buys_only_when_the_numbers_say_it():
    from atmoe.demo.report import _plain_moe

    report = _report([0.37, 0.36], [0.35, 0.35])  # the flat router beats AT-MoE
    report["group_layouts"] = _layouts([0.37, 0.36], [0.55, 0.54], [0.60, 0.61], [0.49, 0.50])
    text = _plain_moe(report)
    assert "0.5450 (does AT-MoE beat it? yes" in text and "0.4950 (yes" in text
    assert text.endswith("a flat softmax given the same groups in its loss does better.")
    report["group_layouts"]["solo_groups"]["eval_loss_per_seed"] = [0.30, 0.31]
    report["group_layouts"]["solo_groups"]["eval_loss"] = 0.305
    assert "what grouping buys" not in _plain_moe(report)
    assert _plain_moe(_report([0.37], [0.35])) == ""
