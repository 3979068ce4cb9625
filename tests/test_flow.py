"""The whole flow on the command line, on a tiny Llama with a tokenizer made here.

add-expert in three groups (style smaller than N_M, so padding is exercised), compose, train a router
twice (and once more with the first seed: same router), route, force, generate, export-lora, and the
lineage rows behind each answer. The training data is built so that the right expert of each group is
known: responses are what the composition says under the intended experts, so routing to them lowers
the eval loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from flow_workspace import DOMAIN, FILLER, FUNCTIONAL, STYLE, make_workspace, word_tokenizer  # noqa: E402,F401

from atmoe.cli import main  # noqa: E402


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A saved base model + tokenizer, five PEFT experts, and train/eval data with known intents."""
    return make_workspace(tmp_path_factory.mktemp("flow"), word_tokenizer())


def add_group_experts(workspace: dict) -> None:
    """add-expert every functional, domain and style expert of ``workspace`` (not the general one)."""
    for group, names in (("functional", FUNCTIONAL), ("domain", DOMAIN), ("style", STYLE)):
        for name in names:
            run("add-expert", str(workspace["paths"][name]), "--name", name, "--group", group)


@pytest.fixture
def composed(workspace) -> dict:
    add_group_experts(workspace)
    run("add-expert", str(workspace["paths"]["gen"]), "--name", "gen", "--group", "general")
    return json.loads(run("compose", "--name", "medqa", "--groups", "functional,domain,style", "--json"))


TRAIN = ("--epochs", "6", "--lr", "0.05", "--batch-size", "8", "--json")


def test_compose_records_layout_and_is_idempotent(composed):
    assert (composed["n_groups"], composed["n_max"], composed["version"], composed["created"]) == (3, 2, 1, True)
    assert [(m["group"], m["slot"], m["name"]) for m in composed["experts"]] == [
        ("functional", 0, "fa"),
        ("functional", 1, "fb"),
        ("domain", 0, "da"),
        ("domain", 1, "db"),
        ("style", 0, "sa"),
    ]
    again = json.loads(run("compose", "--name", "medqa", "--groups", "functional,domain,style", "--json"))
    assert (again["version"], again["created"]) == (1, False)
    narrowed = json.loads(
        run(
            "compose",
            "--name",
            "medqa",
            "--groups",
            "functional,domain,style",
            "--expert",
            "fa",
            "--general",
            "gen",
            "--lambda",
            "0.7",
            "--json",
        )
    )
    assert narrowed["version"] == 2 and narrowed["n_max"] == 2 and narrowed["lambda"] == 0.7
    assert [m["name"] for m in narrowed["experts"]] == ["fa", "da", "db", "sa"]
    listed = json.loads(run("compositions", "--json"))
    assert [c["ref"] for c in listed] == ["medqa@1", "medqa@2"]
    shown = json.loads(run("compositions", "show", "medqa@2", "--json"))
    assert shown["general"]["ref"] == "gen@1"


def test_train_route_force_generate_and_lineage(workspace, composed, atmoe_home):
    from atmoe.data import data_digest
    from atmoe.registry import Registry
    from atmoe.registry.models import CompositionExpert, Expert, Router

    first = json.loads(
        run(
            "train-router",
            "medqa",
            "--data",
            str(workspace["train"]),
            "--eval",
            str(workspace["eval"]),
            "--alias",
            "prod",
            *TRAIN,
        )
    )
    metrics = first["metrics"]
    assert first["ref"] == "medqa@1:1" and first["aliases"] == ["prod"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.05, metrics
    assert metrics["routing_accuracy"] >= 0.75, metrics
    second = json.loads(
        run("train-router", "medqa", "--data", str(workspace["train"]), "--seed", "1", "--alias", "prod", *TRAIN)
    )
    third = json.loads(
        run("train-router", "medqa", "--data", str(workspace["train"]), "--eval", str(workspace["eval"]), *TRAIN)
    )
    assert (second["number"], third["number"]) == (2, 3)
    assert second["aliases"] == ["prod"]  # the alias moved
    assert third["blob_digest"] == first["blob_digest"]  # same data, seed, hyperparameters: same router
    routers = json.loads(run("routers", "medqa", "--json"))
    assert [r["number"] for r in routers] == [1, 2, 3] and routers[0]["aliases"] == []

    routed = json.loads(run("route", "medqa:1", "fa db sa x1 x2", "--json"))
    assert routed["lineage"]["router"] == "medqa@1:1"
    for block in routed["blocks"]:
        assert sum(block["groups"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(block["experts"].values()) == pytest.approx(1.0, abs=1e-5)
        # style has one real expert and one padding slot: the padding slot takes nothing
        assert block["experts"]["sa"] == pytest.approx(block["groups"]["style"], abs=1e-6)
    summary = routed["summary"]["experts"]
    assert summary["fa"] > summary["fb"] and summary["db"] > summary["da"]

    png = atmoe_home.parent / "route.png"
    forced = json.loads(run("route", "medqa", "fa db sa x1 x2", "--force", "fb=1", "--json", "--plot", str(png)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(b["experts"]["fb"] == 1.0 and b["experts"]["fa"] == 0.0 for b in forced["blocks"])
    generated = json.loads(run("generate", "medqa:prod", "fa db sa x1 x2", "--max-new-tokens", "3", "--json"))
    assert generated["lineage"]["router"] == "medqa@1:2" and isinstance(generated["answer"], str)
    plain = CliRunner().invoke(main, ["generate", "medqa", "fa db sa x1 x2", "--max-new-tokens", "2"])
    assert plain.exit_code == 0 and "routing (mean over blocks)" in plain.stderr

    with Registry.open() as registry, registry.session() as session:
        rows = session.query(Router).order_by(Router.number).all()
        assert [r.data_digest for r in rows] == [data_digest(workspace["train"])] * 3
        assert rows[0].eval_data_digest == data_digest(workspace["eval"]) and rows[1].eval_data_digest is None
        assert rows[1].hyperparameters["seed"] == 1 and "torch" in rows[0].library_versions
        assert all(r.composition.ref == "medqa@1" for r in rows)
        for link in session.query(CompositionExpert):
            assert link.digest == session.get(Expert, link.expert_id).digest


def test_remove_refuses_pinned_expert_and_gc_keeps_router_blobs(workspace, composed):
    json.loads(run("train-router", "medqa", "--data", str(workspace["train"]), "--epochs", "1", "--json"))
    result = CliRunner().invoke(main, ["remove", "fa"])
    assert result.exit_code == 1 and "medqa@1" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    report = json.loads(run("gc", "--json"))
    assert not report.get("blobs"), report
    assert run("verify") is not None


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("route", "medqa", "fa x1", "--force", "nobody=1"), 2, "not an expert of medqa@1"),
        (("route", "medqa", "fa x1", "--force", "fa=-1"), 2, ">= 0"),
        (("route", "medqa", "fa x1", "--force", "fa"), 2, "NAME=WEIGHT"),
        (("route", "medqa", "fa x1", "--force", "fa=nan"), 2, "finite"),
        (("route", "nothing", "fa x1"), 1, "no composition nothing"),
        (("route", "medqa:prod", "fa x1"), 1, "no router alias 'prod'"),
        (("compose", "--name", "x", "--groups", "functional,nosuch"), 1, "unknown group 'nosuch'"),
        (
            ("compose", "--name", "x", "--groups", "functional", "--expert", "fa", "--expert", "fa"),
            1,
            "duplicate expert",
        ),
        (("compose", "--name", "x", "--groups", "general"), 1, "fine"),
        (("compose", "--name", "../x", "--groups", "functional"), 2, "looks like a path"),
        (("compose", "--name", "x", "--groups", "functional", "--expert", "nobody"), 1, "no expert named"),
        (("compose", "--name", "x", "--groups", "functional", "--temperature", "0"), 2, "--temperature"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(composed, args, code, fragment):
    from atmoe.registry import Registry
    from atmoe.registry.models import Composition, Router

    if fragment == "fine":  # the general group has one expert: composing it is legal
        run(*args)
        return
    with Registry.open() as registry, registry.session() as session:
        before = (session.query(Composition).count(), session.query(Router).count())
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output
    with Registry.open() as registry, registry.session() as session:
        assert (session.query(Composition).count(), session.query(Router).count()) == before


def test_empty_group_and_mixed_base_models_are_refused(workspace, composed, tmp_path):
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    run("groups", "--add", "empty")
    result = CliRunner().invoke(main, ["compose", "--name", "x", "--groups", "functional,empty"])
    assert result.exit_code == 1 and "group 'empty' has no experts" in result.stderr
    other = make_peft_adapter(make_tiny_llama(seed=9), tmp_path / "other", r=2, seed=3)
    run("add-expert", str(other), "--name", "other", "--group", "style", "--base-model", "someone/else")
    result = CliRunner().invoke(main, ["compose", "--name", "x", "--groups", "functional,style"])
    assert result.exit_code == 1 and "different base models" in result.stderr


def test_malformed_training_line_saves_nothing(workspace, composed, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = Path(workspace["train"]).read_text().splitlines()[:3] + ['{"prompt": "fa"}']
    bad.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["train-router", "medqa", "--data", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl:4:" in result.stderr
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "fa", "response": "x1", "intents": ["zz"]}) + "\n")
    result = CliRunner().invoke(main, ["train-router", "medqa", "--data", str(unknown)])
    assert result.exit_code == 1 and "unknown.jsonl:1: unknown expert" in result.stderr
    assert json.loads(run("routers", "medqa", "--json")) == []


def test_export_lora_from_cli(workspace, composed, tmp_path):
    out = tmp_path / "plan"
    run("export-lora", "medqa", str(out), "--force", "fa=0.5", "--force", "db=0.5")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter_model.safetensors").is_file()
    # the exported adapter is itself a valid expert
    run("add-expert", str(out), "--name", "plan-fa-db", "--group", "general")


def test_export_lora_with_a_rank_cap_reports_its_error(workspace, composed, tmp_path):
    result = CliRunner().invoke(
        main,
        ["export-lora", "medqa", str(tmp_path / "capped"), "--force", "fa=0.5", "--force", "db=0.5", "--rank", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "rank 1: max relative error" in result.stderr
    config = json.loads((tmp_path / "capped" / "adapter_config.json").read_text())
    assert config["r"] == 1 and not config["rank_pattern"]
    bad = CliRunner().invoke(main, ["export-lora", "medqa", str(tmp_path / "x"), "--force", "fa=1", "--rank", "0"])
    assert bad.exit_code == 2


def test_a_uniform_router_needs_no_data_and_routes_evenly(workspace, composed):
    record = json.loads(
        run("train-router", "medqa", "--kind", "uniform", "--eval", str(workspace["eval"]), "--alias", "even", "--json")
    )
    assert record["kind"] == "uniform" and record["data_digest"] is None
    assert record["metrics"]["eval_loss"] > 0 and 0 <= record["metrics"]["routing_accuracy"] <= 1
    routed = json.loads(run("route", "medqa:even", "a prompt", "--json"))
    for block in routed["blocks"]:
        groups = block["groups"]
        assert all(abs(w - 1 / len(groups)) < 1e-6 for w in groups.values())  # even over groups
        assert abs(sum(block["experts"].values()) - 1) < 1e-6
    assert "uniform" in run("routers", "medqa")
    bad = CliRunner().invoke(main, ["train-router", "medqa", "--kind", "uniform", "--data", str(workspace["train"])])
    assert bad.exit_code == 2 and "takes no --data" in bad.stderr
    missing = CliRunner().invoke(main, ["train-router", "medqa"])
    assert missing.exit_code == 2 and "needs --data" in missing.stderr
