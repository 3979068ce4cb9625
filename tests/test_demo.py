"""The end-to-end demo (`atmoe-reg demo --quick`): runs the real command into a temp folder; and the
default profile's group-layout comparison on tiny budgets.

The quick profile takes about 4 minutes on 2 CPU cores. It is marked slow so that README's everyday
test command stays at a few minutes; `.ci/run` runs the slow tests too (`pytest -m slow`).
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from atmoe.cli import main

pytestmark = pytest.mark.slow

METHODS = ("base", "best_single_expert", "general_only", "uniform_mixture", "flat_router", "shared_router", "atmoe")


def test_demo_quick_writes_a_finite_report(tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    result = CliRunner().invoke(
        main, ["demo", "--quick", "--out", str(out), "--home", str(home)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    for method in METHODS:
        for key in ("eval_loss", "accuracy"):
            value = report["methods"][method][key]
            assert isinstance(value, float) and math.isfinite(value), (method, key, value)
        assert 0.0 <= report["methods"][method]["accuracy"] <= 1.0
    assert 0.0 <= report["routing_accuracy"] <= 1.0
    sweep = report["temperature_sweep"]
    assert [row["temperature"] for row in sweep] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert all(math.isfinite(row["eval_loss"]) for row in sweep)
    assert isinstance(report["verdict"]["success"], bool)
    diagnostics = report["diagnostics"]
    assert set(diagnostics["expert_own_task"]) >= {"count", "parity", "animal", "loud", "general"}
    for key in ("oracle_routing_atmoe", "forced_intended_full"):
        assert math.isfinite(diagnostics[key]["eval_loss"]), key
    # the quick profile places each group's experts on its own block (PEFT layers_to_transform)
    assert {report["experts"][name]["layers"][0] for name in ("count", "animal", "loud")} == {0, 1, 2}
    assert report["experts"]["general"]["layers"] is None
    # the quick profile trains each router method once; its per-run numbers are the reported ones
    for method in ("flat_router", "shared_router", "atmoe"):
        assert len(report["routers"][method]["routers"]) == 1
        assert report["method_details"][method]["eval_loss_per_seed"] == [report["methods"][method]["eval_loss"]]
    assert (out / "report.md").read_text().startswith("# atmoe-reg demo report")
    assert (out / "routing_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the demo's catalog holds the experts and one router per composition
    from atmoe.registry.registry import Registry

    with Registry.open(home=home) as registry:
        names = {e.name for e in registry.list_experts()}
        assert {"count", "parity", "animal", "loud", "general"} <= names
        for composition in ("demo-flat", "demo-shared"):
            assert len(registry.routers(composition)) == 1
        # demo-atmoe: its trained router and one of each other kind (one seed in the quick profile)
        kinds = sorted(r.kind for r in registry.routers("demo-atmoe"))
        assert kinds == ["arrow", "arrow+gks", "lorahub", "trained", "trained", "uniform"]
        assert len(registry.evaluations("demo-atmoe")) == 6  # each scored by `eval`, stored
    assert set(report["router_kinds"]) == {
        "trained",
        "uniform",
        "arrow",
        "arrow+gks",
        "lorahub",
        "trained, --init prompts",
    }
    for kind, info in report["router_kinds"].items():
        assert info["runs"] == 1 and math.isfinite(info["eval_loss"]["mean"]), kind
    assert "## Router kinds" in (out / "report.md").read_text()


def test_demo_help_lists_its_options():
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    for option in ("--quick", "--out", "--home", "--base-model"):
        assert option in result.output


def test_group_layouts_on_a_tiny_profile(tmp_path, monkeypatch):
    """The default profile's layout comparison, end to end on tiny budgets (seconds, not minutes): every
    layout is registered (the same blobs under its own names), composed, trained per seed and scored."""
    from dataclasses import replace

    from atmoe.demo import pipeline, tasks
    from atmoe.demo.layouts import LAYOUTS
    from atmoe.registry.registry import Registry

    tiny = replace(
        pipeline.QUICK,
        suite=tasks.DEFAULT_SUITE,
        base=replace(pipeline.QUICK.base, pretrain_steps=40),
        expert=replace(pipeline.QUICK.expert, steps=20),
        general_steps=20,
        n_expert=40,
        n_router=48,
        n_router_eval=16,
        n_test=24,
        router_epochs=1,
        router_seeds=2,
        layouts=LAYOUTS,
    )
    monkeypatch.setattr(pipeline, "QUICK", tiny)
    home = tmp_path / "home"
    report = pipeline.run_demo(tmp_path / "out", quick=True, home=home)
    layouts = report["group_layouts"]
    assert list(layouts) == ["intent_groups", *LAYOUTS]
    shapes = {name: (info["n_groups"], info["n_max"]) for name, info in layouts.items()}
    assert shapes == {"intent_groups": (3, 3), "one_group": (1, 8), "mixed_groups": (3, 3), "solo_groups": (8, 1)}
    for name, info in layouts.items():
        assert len(info["eval_loss_per_seed"]) == len(info["routers"]) == 2, name
        assert math.isfinite(info["eval_loss"]) and 0.0 <= info["routing_accuracy"] <= 1.0, name
    assert layouts["intent_groups"]["eval_loss"] == report["methods"]["atmoe"]["eval_loss"]
    kinds = report["router_kinds"]  # the router kinds, seeded ones twice, on the same test split
    assert {k: v["runs"] for k, v in kinds.items()} == {
        "trained": 2, "uniform": 1, "arrow": 1, "arrow+gks": 1, "lorahub": 2, "trained, --init prompts": 2,
    }  # fmt: skip
    assert all(math.isfinite(v["eval_loss"]["mean"]) for v in kinds.values())
    with Registry.open(home=home) as registry:
        experts = {e.name: e for e in registry.list_experts()}
        assert experts["animal-mixed"].digest == experts["animal"].digest  # the same adapter, a new row
        assert [e.name for e in registry.list_experts(domain="animal")] == [
            "animal",
            "animal-mixed",
            "animal-one",
            "animal-solo",
        ]
        assert len(registry.routers("demo-solo-groups")) == 2
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| one group of all experts (`one_group`) | 1 x 8 |" in text
