"""Stored evaluations: eval scores a router on a data file and stores the row; evals compares the routers of a
composition on the same data. Same router and data give the same metrics; bad input changes nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import invoke  # noqa: E402
from test_flow import add_group_experts, run, workspace  # noqa: E402,F401  (the module's fixture)


@pytest.fixture
def routed(workspace) -> dict:  # noqa: F811
    add_group_experts(workspace)
    run("compose", "--name", "medqa", "--groups", "functional,domain,style")
    run("train-router", "medqa", "--kind", "uniform", "--alias", "even")
    run(
        "train-router", "medqa", "--data", str(workspace["train"]), "--epochs", "3", "--lr", "0.05", "--batch-size", "8"
    )
    return workspace


def test_eval_stores_a_reproducible_row_and_evals_compares_the_routers(routed, tmp_path) -> None:
    data = str(routed["eval"])
    first = json.loads(run("eval", "medqa:1", "--data", data, "--json"))
    again = json.loads(run("eval", "medqa:even", "--data", data, "--json"))
    assert first["router"] == again["router"] == "medqa@1:1" and first["kind"] == "uniform"
    assert first["metrics"] == again["metrics"] and first["id"] != again["id"]  # reproducible, stored twice
    assert set(first["metrics"]) == {"eval_loss", "exact_match", "routing_accuracy", "tokens"}
    assert 0 <= first["metrics"]["exact_match"] <= 1 and first["examples"] == 32
    trained = json.loads(run("eval", "medqa", "--data", data, "--json"))  # the newest router: 2
    assert trained["router"] == "medqa@1:2" and trained["kind"] == "trained"
    assert trained["metrics"]["routing_accuracy"] > first["metrics"]["routing_accuracy"]

    rows = json.loads(run("evals", "medqa", "--json"))
    assert [r["router"] for r in rows] == sorted(
        ["medqa@1:1", "medqa@1:2"],
        key=lambda ref: {"medqa@1:1": first, "medqa@1:2": trained}[ref]["metrics"]["eval_loss"],
    )  # one row per router (the newest of its evaluations), best eval loss first
    assert {r["data_digest"] for r in rows} == {first["data_digest"]}
    table = run("evals", "medqa")
    assert "medqa@1:1" in table and "uniform" in table and "trained" in table
    plot = tmp_path / "evals.png"
    run("evals", "medqa", "--data", data, "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run("evals", "medqa", "--data-digest", first["data_digest"][:12], "--json")) == rows
    assert json.loads(run("evals", "medqa", "--data-digest", "0" * 12, "--json")) == []


def test_bad_eval_input_is_one_line_and_stores_nothing(routed, tmp_path, snapshot) -> None:
    run("compose", "--name", "bare", "--groups", "functional")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "a", "response": "b", "intents": ["nobody"]}) + "\n")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "a"\n')
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "fa da", "response": "x0"}) + "\n")
    run("eval", "medqa:1", "--data", str(other))
    run("eval", "medqa:1", "--data", str(routed["eval"]))  # two data files: --plot must be told which
    before = snapshot()
    cases = [
        (("eval", "bare", "--data", str(routed["eval"])), 1, "has no trained router"),
        (("eval", "medqa:7", "--data", str(routed["eval"])), 1, "has no router 7"),
        (("eval", "medqa", "--data", str(tmp_path / "missing.jsonl")), 1, "no such file"),
        (("eval", "medqa", "--data", str(unknown)), 1, "unknown expert(s) in 'intents': nobody"),
        (("eval", "medqa", "--data", str(malformed)), 1, "invalid JSON"),
        (("eval", "medqa", "--data", str(routed["eval"]), "--max-new-tokens", "0"), 2, "--max-new-tokens"),
        (("eval", "medqa", "--data", str(routed["eval"]), "--batch-size", "0"), 2, "--batch-size"),
        (("evals", "medqa", "--data-digest", "xyz"), 2, "hex digits"),
        (("evals", "medqa", "--plot", str(tmp_path / "p.png")), 2, "--plot draws one data file"),
        (("evals", "no/such"), 2, "composition name"),
    ]
    for args, code, message in cases:
        result = invoke(*args)
        assert result.exit_code == code and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert snapshot() == before, args
    assert not (tmp_path / "p.png").exists()


def test_removing_a_composition_removes_its_evaluations(routed) -> None:
    run("eval", "medqa:1", "--data", str(routed["eval"]))
    run("compositions", "remove", "medqa", "--force")
    assert json.loads(run("evals", "medqa", "--json")) == []
