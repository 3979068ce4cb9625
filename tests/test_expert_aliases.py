"""Expert aliases (``gastro@stable``): set and move them, resolve them wherever an expert reference is
accepted, refuse the ones that would shadow a version, and guard the versions they point at.
Runs on SQLite, and on PostgreSQL with ATMOE_TEST_PG=1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402


@pytest.fixture
def gastro(tmp_path: Path) -> None:
    """gastro@1, gastro@2 (domain) and diagnosis@1 (functional), same base model."""
    for seed, (name, group) in enumerate([("gastro", "domain"), ("gastro", "domain"), ("diagnosis", "functional")]):
        ok("add-expert", write_adapter(tmp_path / f"a{seed}", seed=seed), "--name", name, "--group", group)


def show(ref: str) -> dict[str, Any]:
    return json.loads(ok("show", ref, "--json").stdout)


def test_an_alias_resolves_wherever_an_expert_reference_does(gastro: None, tmp_path: Path) -> None:
    assert "gastro@stable -> gastro@1" in ok("alias-expert", "gastro@1", "stable").stderr
    record = show("gastro@stable")
    assert (record["ref"], record["aliases"]) == ("gastro@1", ["stable"])
    assert show("gastro@2")["aliases"] == [] and show("gastro")["ref"] == "gastro@2"

    composed = json.loads(
        ok("compose", "--name", "med", "--groups", "functional,domain", "--expert", "gastro@stable", "--json").stdout
    )
    assert [m["ref"] for m in composed["experts"]] == ["diagnosis@1", "gastro@1"]  # not the latest, gastro@2
    general = json.loads(
        ok("compose", "--name", "g", "--groups", "functional", "--general", "gastro@stable", "--json").stdout
    )
    assert general["general"]["ref"] == "gastro@1"
    assert "of 1 experts" in ok("verify", "gastro@stable").stderr
    exported = json.loads(ok("export", "gastro@stable", "--out", tmp_path / "s.tar", "--json").stdout)
    assert exported["experts"] == ["gastro@1"]

    # moving the alias changes what it names from now on, never a composition already pinned
    assert "gastro@stable -> gastro@2 (was gastro@1)" in ok("alias-expert", "gastro@2", "stable").stderr
    assert show("gastro@stable")["ref"] == "gastro@2"
    assert [m["ref"] for m in json.loads(ok("compositions", "show", "med", "--json").stdout)["experts"]] == [
        "diagnosis@1", "gastro@1",
    ]  # fmt: skip
    assert "already points at gastro@2" in ok("alias-expert", "gastro@stable", "stable").stderr
    ok("alias-expert", "gastro@stable", "candidate")  # an alias may be named by another
    listed = json.loads(ok("expert-aliases", "--json").stdout)
    assert [(a["alias"], a["target"]) for a in listed] == [
        ("gastro@candidate", "gastro@2"),
        ("gastro@stable", "gastro@2"),
    ]
    assert json.loads(ok("expert-aliases", "diagnosis", "--json").stdout) == []
    assert "gastro@candidate" in ok("expert-aliases").stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["gastro@1", "3"], 2, "alias '3' would read as a version number"),
        (["gastro@1", "007"], 2, "would read as a version number"),
        (["gastro@1", "latest"], 2, "would read as a version number"),
        (["gastro@1", "../x"], 2, "looks like a path"),
        (["gastro@1", "a b"], 2, "alias 'a b' is not valid"),
        (["gastro@9", "stable"], 1, "has no version 9"),
        (["nobody@1", "stable"], 1, "no expert named 'nobody'"),
        (["gastro@1:prod", "stable"], 2, "takes no ':ROUTER' part"),
        (["gastro@nope", "stable"], 1, "has no alias 'nope'"),
    ],
)
def test_bad_aliases_are_one_line_and_change_nothing(
    gastro: None, snapshot: Callable[[], Any], args: list[str], code: int, fragment: str
) -> None:
    before = snapshot()
    assert_one_line(invoke("alias-expert", *args), code, fragment)
    assert snapshot() == before


def test_unknown_aliases_name_the_known_ones(gastro: None) -> None:
    assert_one_line(invoke("show", "gastro@stable"), 1, "it has none: atmoe-reg alias-expert gastro@VERSION stable")
    ok("alias-expert", "gastro@1", "stable")
    assert_one_line(invoke("show", "gastro@prod"), 1, "has no alias 'prod' (aliases: stable)")
    assert_one_line(invoke("show", "nobody@stable"), 1, "no expert named 'nobody'")
    # aliases belong to experts and routers: a composition's versions stay numbers
    ok("compose", "--name", "med", "--groups", "domain")
    assert_one_line(invoke("compositions", "show", "med@stable"), 1, "composition versions are numbers")
    assert_one_line(invoke("routers", "med@stable"), 1, "composition versions are numbers")


def test_an_aliased_version_is_removed_only_with_force(gastro: None, snapshot: Callable[[], Any]) -> None:
    ok("alias-expert", "gastro@1", "stable")
    before = snapshot()
    assert_one_line(invoke("remove", "gastro@1"), 1, "alias gastro@stable -> gastro@1 points at it")
    assert_one_line(invoke("remove", "gastro@stable"), 1, "pass --force to remove it too")
    assert snapshot() == before
    assert "Removed gastro@1" in ok("remove", "gastro@stable", "--force").stderr
    assert json.loads(ok("expert-aliases", "--json").stdout) == []
    assert show("gastro")["ref"] == "gastro@2"
    (removal,) = json.loads(ok("log", "--json", "--action", "remove").stdout)
    assert removal["target"] == "gastro@1" and removal["details"]["aliases"] == ["gastro@stable"]


def test_the_database_keeps_an_aliased_version(gastro: None, registry: Registry) -> None:
    """Bypassing the tool: the foreign key refuses to delete a version an alias points at."""
    ok("alias-expert", "gastro@1", "stable")
    with pytest.raises(IntegrityError):
        with registry.engine.begin() as connection:
            connection.execute(text("DELETE FROM expert_files WHERE expert_id IN "
                                    "(SELECT id FROM experts WHERE name = 'gastro' AND version = 1)"))  # fmt: skip
            connection.execute(text("DELETE FROM experts WHERE name = 'gastro' AND version = 1"))
    assert show("gastro@stable")["ref"] == "gastro@1"


def test_alias_moves_are_logged(gastro: None) -> None:
    ok("alias-expert", "gastro@1", "stable")
    ok("alias-expert", "gastro@2", "stable")
    ok("alias-expert", "gastro@2", "stable")  # no change: no event
    moves = json.loads(ok("log", "--json", "--action", "alias").stdout)
    assert [(m["target"], m["details"]["from"], m["details"]["to"]) for m in moves] == [
        ("gastro@stable", None, "gastro@1"),
        ("gastro@stable", "gastro@1", "gastro@2"),
    ]
