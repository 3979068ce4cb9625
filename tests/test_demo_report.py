"""The demo report's comparisons between methods: a gap inside the router runs' spread is a tie."""

from __future__ import annotations

from statistics import fmean

from atmoe.demo.report import _compare


def _report(ours: list[float], other: list[float]) -> dict:
    return {"methods": {"atmoe": {"eval_loss": fmean(ours)}, "flat_router": {"eval_loss": fmean(other)},
                        "uniform_mixture": {"eval_loss": 5.0}},
            "method_details": {"atmoe": {"eval_loss_per_seed": ours}, "flat_router": {"eval_loss_per_seed": other}}}


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
