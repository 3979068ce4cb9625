"""atmoe-reg expert commands through CliRunner on a temp home; the database is reopened and checked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from atmoe.cli import main
from atmoe.registry import Registry, db
from atmoe.registry.models import Composition, CompositionExpert, Expert, Router
from atmoe.registry.validate import WEIGHTS_FILE, read_safetensors_header


def invoke(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ok(*args: str | os.PathLike[str]) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result: Result, code: int, match: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and match in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


def list_json(*filters: str) -> list[dict[str, Any]]:
    return json.loads(ok("list", "--json", *filters).stdout)


def add(adapters: dict[str, Path], key: str, name: str | None = None, group: str = "functional", *extra: str) -> Result:
    return ok("add-expert", adapters[key], "--name", name or key, "--group", group, *extra)


def expert_rows() -> list[Expert]:
    with Registry.open() as registry, registry.session() as session:
        return list(session.scalars(select(Expert).order_by(Expert.name, Expert.version)))


# -- init, home, options ----------------------------------------------------------------------------


def test_init_is_idempotent(atmoe_home: Path, snapshot: Callable[[], Any]) -> None:
    first = ok("init")
    assert "Registry ready" in first.stderr
    state = snapshot()
    assert state["rows"]["groups"] == 4 and state["rows"]["revision"] == db.HEAD
    assert (atmoe_home / "store").is_dir()
    ok("init")
    assert snapshot() == state
    info = json.loads(ok("init", "--json").stdout)
    assert info["store"] == str(atmoe_home / "store") and info["revision"] == info["head"]


def test_home_db_and_store_options(tmp_path: Path, adapters: dict[str, Path], sqlite_only: None) -> None:
    home, store, database = tmp_path / "h", tmp_path / "blobs", tmp_path / "cat.db"
    ok(
        "--home",
        home,
        "--store",
        store,
        "--db",
        database,
        "add-expert",
        adapters["gastro"],
        "--name",
        "g",
        "--group",
        "domain",
    )
    assert database.is_file() and not (home / "registry.db").exists()
    assert len([p for p in (store / "sha256").rglob("*") if p.is_file()]) == 3
    with Registry.open(db_url=f"sqlite:///{database}", store=store) as registry:
        assert [e.ref for e in registry.list_experts()] == ["g@1"]
    assert list_json() == []  # the default home is another registry


def test_environment_variables(tmp_path: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "shared-store"
    monkeypatch.setenv("ATMOE_STORE", str(store))
    add(adapters, "gastro")
    assert (store / "sha256").is_dir()


# -- add, list, show ----------------------------------------------------------------------------------


def test_add_list_show(adapters: dict[str, Path]) -> None:
    result = add(
        adapters, "diagnosis", None, "functional", "--tag", "team=gi", "--tag", "stage=dev", "--description", "dx"
    )
    assert "Added diagnosis@1 to group functional" in result.stderr and result.stdout == ""
    add(adapters, "gastro", None, "domain", "--domain", "gastroenterology", "--base-model", "tiny/llama")
    add(adapters, "rigorous", None, "style", "--style", "rigorous", "--tag", "team=gi")

    experts = {e.name: e for e in expert_rows()}
    assert sorted(experts) == ["diagnosis", "gastro", "rigorous"]
    diagnosis = experts["diagnosis"]
    assert (diagnosis.version, diagnosis.group.name, diagnosis.peft_type) == (1, "functional", "LORA")
    assert diagnosis.tags == {"team": "gi", "stage": "dev"} and diagnosis.description == "dx"
    assert (diagnosis.r, diagnosis.alpha, diagnosis.use_rslora) == (4, 8.0, False)
    assert diagnosis.target_modules == ["q_proj", "v_proj"]
    assert diagnosis.module_ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4}
    assert diagnosis.source == str(adapters["diagnosis"].resolve())
    manifest = {f.path: (f.sha256, f.size) for f in diagnosis.files}
    for path, (sha256, size) in manifest.items():
        content = (adapters["diagnosis"] / path).read_bytes()
        assert (sha256, size) == (hashlib.sha256(content).hexdigest(), len(content))
    sha256sum = "".join(f"{sha}  {path}\n" for path, (sha, _) in sorted(manifest.items()))
    assert diagnosis.digest == hashlib.sha256(sha256sum.encode()).hexdigest()
    assert experts["gastro"].domain == "gastroenterology" and experts["gastro"].base_model == "tiny/llama"
    rigorous = experts["rigorous"]
    assert (rigorous.style, rigorous.use_rslora, rigorous.rank_pattern) == ("rigorous", True, {"k_proj": 2})
    assert rigorous.module_ranks["model.layers.0.self_attn.k_proj"] == 2

    assert [r["name"] for r in list_json()] == ["diagnosis", "gastro", "rigorous"]
    assert [r["name"] for r in list_json("--group", "domain")] == ["gastro"]
    assert [r["name"] for r in list_json("--domain", "gastroenterology")] == ["gastro"]
    assert [r["name"] for r in list_json("--style", "rigorous")] == ["rigorous"]
    assert [r["name"] for r in list_json("--tag", "team=gi")] == ["diagnosis", "rigorous"]
    assert [r["name"] for r in list_json("--tag", "team=gi", "--tag", "stage=dev")] == ["diagnosis"]
    assert [r["name"] for r in list_json("--tag", "stage")] == ["diagnosis"]
    assert [r["name"] for r in list_json("--base-model", "tiny/llama")] == ["gastro"]
    assert list_json("--group", "style", "--tag", "stage=dev") == []

    table = ok("list").stdout
    assert "diagnosis@1" in table and diagnosis.digest[:12] in table and "DIGEST" in table

    shown = json.loads(ok("show", "diagnosis", "--json").stdout)
    assert shown["ref"] == "diagnosis@1" and shown["digest"] == diagnosis.digest
    assert {f["path"]: f["sha256"] for f in shown["files"]} == {p: s for p, (s, _) in manifest.items()}
    text = ok("show", "gastro@1").stdout
    assert "gastroenterology" in text and experts["gastro"].files[0].sha256 in text


def test_base_model_from_the_adapter_config(adapter_copy: Callable[[str], Path]) -> None:
    root = adapter_copy("gastro")
    config = json.loads((root / "adapter_config.json").read_text())
    config.update(base_model_name_or_path="org/tiny-llama", revision="abc123")
    (root / "adapter_config.json").write_text(json.dumps(config))
    ok("add-expert", root, "--name", "g", "--group", "domain")
    ok("add-expert", root, "--name", "h", "--group", "domain", "--base-model", "local/llama", "--base-revision", "r2")
    rows = {e.name: (e.base_model, e.base_revision) for e in expert_rows()}
    assert rows == {"g": ("org/tiny-llama", "abc123"), "h": ("local/llama", "r2")}


def test_relative_base_model_path_is_recorded_absolute(
    adapter_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = adapter_copy("gastro")
    config = json.loads((root / "adapter_config.json").read_text())
    config.update(base_model_name_or_path="models/base")  # PEFT records the path as it was loaded
    (root / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ok("add-expert", root, "--name", "g", "--group", "domain")
    assert [e.base_model for e in expert_rows()] == [str(tmp_path / "models" / "base")]
    assert [e["name"] for e in list_json("--base-model", "models/base")] == ["g"]


def test_identical_content_makes_no_new_version(adapters: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(adapters, "gastro", "gastro", "domain")
    before = snapshot()
    again = add(adapters, "gastro", "gastro", "domain")
    assert "already gastro@1" in again.stderr
    assert snapshot() == before
    assert [e.ref for e in expert_rows()] == ["gastro@1"]


def test_new_content_under_the_same_name_is_the_next_version(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", "gastro", "domain")
    result = add(adapters, "rigorous", "gastro", "domain")
    assert "Added gastro@2" in result.stderr
    assert [e.ref for e in expert_rows()] == ["gastro@1", "gastro@2"]
    assert json.loads(ok("show", "gastro", "--json").stdout)["version"] == 2
    assert json.loads(ok("show", "gastro@latest", "--json").stdout)["version"] == 2
    assert json.loads(ok("show", "gastro@1", "--json").stdout)["r"] == 2
    assert "already gastro@1" in add(adapters, "gastro", "gastro", "domain").stderr


def test_same_content_under_another_name_shares_the_blobs(
    adapters: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    add(adapters, "gastro", "gastro", "domain")
    files = snapshot()["store"]
    add(adapters, "gastro", "gastro-copy", "domain")
    assert snapshot()["store"] == files
    assert [e.ref for e in expert_rows()] == ["gastro@1", "gastro-copy@1"]


def test_concurrent_adds_allocate_distinct_versions(adapters: dict[str, Path]) -> None:
    with Registry.open() as registry:
        errors: list[BaseException] = []

        def add_one(key: str) -> None:
            try:
                registry.add_expert(adapters[key], name="shared", group="functional")
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=add_one, args=(key,)) for key in ("diagnosis", "gastro", "rigorous")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
    assert sorted(e.version for e in expert_rows()) == [1, 2, 3]


# -- groups -------------------------------------------------------------------------------------------


def test_groups_list_and_add(adapters: dict[str, Path]) -> None:
    groups = json.loads(ok("groups", "--json").stdout)
    assert [g["name"] for g in groups] == ["functional", "domain", "style", "general"]
    result = ok("groups", "--add", "safety", "--description", "Refusals and red flags")
    assert "Added group safety" in result.stderr
    assert "already exists" in ok("groups", "--add", "safety").stderr
    add(adapters, "diagnosis", "triage", "safety")
    groups = {g["name"]: g for g in json.loads(ok("groups", "--json").stdout)}
    assert groups["safety"] == {"name": "safety", "description": "Refusals and red flags", "experts": 1}
    assert "safety" in ok("groups").stdout
    with Registry.open() as registry:
        assert [g.name for g in registry.groups()][-1] == "safety"


# -- verify --------------------------------------------------------------------------------------------


def _alter(digest: str, registry: Registry) -> None:
    path = registry.store.path_for(digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_every_bad_blob(adapters: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(adapters, "diagnosis")
    add(adapters, "gastro", None, "domain")
    assert "OK: 5 blobs of 2 experts" in ok("verify").stderr  # README.md is shared
    with Registry.open() as registry:
        diagnosis, gastro = registry.get_expert("diagnosis"), registry.get_expert("gastro")
        bad_weights = next(f for f in diagnosis.files if f.path == WEIGHTS_FILE)
        bad_config = next(f for f in gastro.files if f.path == "adapter_config.json")
        _alter(bad_weights.sha256, registry)
        _alter(bad_config.sha256, registry)
    before = snapshot()

    result = invoke("verify")
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("Error: ") for line in lines)
    assert f"diagnosis@1 {WEIGHTS_FILE}: blob sha256:{bad_weights.sha256} is altered on disk" in lines[0]
    assert f"gastro@1 adapter_config.json: blob sha256:{bad_config.sha256}" in lines[1]

    assert_one_line_error(invoke("verify", "gastro"), 1, bad_config.sha256)
    report = invoke("verify", "--json")
    assert report.exit_code == 1
    data = json.loads(report.stdout)
    assert not data["ok"] and {p["digest"] for p in data["problems"]} == {bad_weights.sha256, bad_config.sha256}
    assert snapshot() == before  # verify changes nothing


def test_verify_finds_missing_blobs_and_router_blobs(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", None, "domain")
    with Registry.open() as registry:
        expert = registry.get_expert("gastro")
        router_blob = registry.store.put_bytes(b"router weights").digest
        with registry.write() as session:
            composition = _composition(session, expert)
            session.add(Router(composition=composition, number=1, blob_digest=router_blob))
        registry.store.remove(router_blob)
    line = assert_one_line_error(invoke("verify"), 1, "med@1:1")
    assert f"sha256:{router_blob} is missing" in line


def _row(session: Any, expert: Any) -> Expert:
    return session.scalar(select(Expert).where(Expert.name == expert.name, Expert.version == expert.version))


# -- remove and gc -------------------------------------------------------------------------------------


def _composition(session: Any, expert: Any, *, general: Any = None) -> Composition:
    """A composition row pinning ``expert`` (a record or row; its row is read in ``session``)."""
    expert = _row(session, expert)
    general = _row(session, general) if general is not None else None
    composition = Composition(
        name="med",
        version=1,
        groups=[expert.group.name],
        n_groups=1,
        n_max=1,
        spec_digest="c" * 64,
        general_expert_id=general.id if general else None,
    )
    composition.members.append(
        CompositionExpert(
            expert_id=expert.id, group_name=expert.group.name, group_index=0, slot=0, digest=expert.digest
        )
    )
    session.add(composition)
    session.flush()
    return composition


def test_remove_then_gc(adapters: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(adapters, "gastro", None, "domain")
    add(adapters, "diagnosis")
    blobs = snapshot()["store"]
    result = ok("remove", "gastro@1")
    assert "Removed gastro@1" in result.stderr
    assert [e.ref for e in expert_rows()] == ["diagnosis@1"]
    assert snapshot()["rows"]["expert_files"] == 3
    assert snapshot()["store"] == blobs  # blobs wait for gc

    # gastro's README.md is the same blob as diagnosis's: two blobs are unreferenced
    dry = json.loads(ok("gc", "--json", "--grace", "0").stdout)
    assert dry["dry_run"] and len(dry["blobs"]) == 2 and dry["temp_files"] == []
    assert snapshot()["store"] == blobs
    kept = json.loads(ok("gc", "--json").stdout)  # default grace: the blobs are too young
    assert kept["blobs"] == [] and kept["kept_recent"] == 2
    assert "run with --apply" in ok("gc", "--grace", "0").stderr
    applied = ok("gc", "--apply", "--grace", "0")
    assert "Removed 2 unreferenced blobs" in applied.stderr
    assert len(snapshot()["store"]) == 3
    assert "OK: 3 blobs" in ok("verify").stderr


def test_gc_keeps_router_blobs_and_young_files_and_removes_stale_temp_files(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", None, "domain")
    with Registry.open() as registry:
        store = registry.store
        router_blob = store.put_bytes(b"router").digest
        orphan_old = store.put_bytes(b"orphan old").digest
        orphan_new = store.put_bytes(b"orphan new").digest
        old = time.time() - 7200
        os.utime(store.path_for(orphan_old), (old, old))
        stale = store.blobs_dir / ".tmp-stale"
        stale.write_bytes(b"partial")
        os.utime(stale, (old, old))
        fresh = store.blobs_dir / ".tmp-fresh"
        fresh.write_bytes(b"partial")
        with registry.write() as session:
            composition = _composition(session, registry.get_expert("gastro"))
            session.add(Router(composition_id=composition.id, number=1, blob_digest=router_blob))
        report = registry.gc(dry_run=False)
        assert [b["digest"] for b in report.blobs] == [orphan_old]
        assert report.temp_files == [str(stale)] and report.kept_recent == 1
        assert store.has(router_blob) and store.has(orphan_new) and not store.has(orphan_old)
        assert fresh.exists() and not stale.exists()
        assert registry.verify() == []


def test_remove_refuses_while_a_composition_pins_the_expert(
    adapters: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    add(adapters, "gastro", None, "domain")
    add(adapters, "rigorous", "general-1", "general")
    with Registry.open() as registry, registry.write() as session:
        _composition(session, registry.get_expert("gastro"), general=registry.get_expert("general-1"))
    before = snapshot()
    assert_one_line_error(invoke("remove", "gastro@1"), 1, "pinned by composition med@1")
    assert_one_line_error(invoke("remove", "gastro", "--force"), 1, "pinned by composition med@1")
    assert_one_line_error(invoke("remove", "general-1"), 1, "pinned by composition med@1")
    assert snapshot() == before


def test_remove_a_name_with_several_versions(adapters: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(adapters, "gastro", "g", "domain")
    add(adapters, "rigorous", "g", "domain")
    before = snapshot()
    assert_one_line_error(invoke("remove", "g"), 2, "--force")
    assert snapshot() == before
    ok("remove", "g@latest")
    assert [e.ref for e in expert_rows()] == ["g@1"]
    add(adapters, "rigorous", "g", "domain")
    ok("remove", "g", "--force")
    assert expert_rows() == []


# -- errors: one line, right exit code ---------------------------------------------------------------


def test_unknown_expert_and_bad_references() -> None:
    assert_one_line_error(invoke("show", "nobody"), 1, "no expert named 'nobody'")
    assert_one_line_error(invoke("show", "nobody@x"), 2, "version must be a number")
    assert_one_line_error(invoke("show", "nobody:prod"), 2, "takes no ':ROUTER'")
    assert_one_line_error(invoke("remove", "nobody"), 1, "no expert named")
    assert_one_line_error(invoke("verify", "../x"), 2, "looks like a path")


def test_click_usage_errors_are_one_line() -> None:
    assert_one_line_error(invoke("add-expert", "x", "--group", "domain"), 2, "Missing option '--name'")
    assert_one_line_error(invoke("list", "--bogus"), 2, "No such option")
    assert_one_line_error(invoke("gc", "--grace", "-1"), 2, "--grace")
    assert_one_line_error(invoke("groups", "--description", "x"), 2, "--description needs --add")


def test_version_missing_in_show(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", None, "domain")
    assert_one_line_error(invoke("show", "gastro@7"), 1, "has no version 7 (versions: 1)")


# -- bad input changes nothing (DESIGN section 5) ------------------------------------------------------


def _damage_not_peft(root: Path) -> None:
    (root / "adapter_config.json").unlink()


def _damage_pickle(root: Path) -> None:
    (root / "adapter_model.bin").write_bytes(b"\x80\x04\x95 pickled weights")


def _damage_corrupt(root: Path) -> None:
    weights = root / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"
    weights.write_bytes(bytes(data))


def _damage_truncated(root: Path) -> None:
    weights = root / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])


def _damage_shapes(root: Path) -> None:
    config = json.loads((root / "adapter_config.json").read_text())
    config["r"] = config["r"] + 1
    (root / "adapter_config.json").write_text(json.dumps(config))


def _damage_values(bad: float) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        import numpy as np

        weights = root / WEIGHTS_FILE
        header = read_safetensors_header(weights)
        last = max(header.tensors.values(), key=lambda t: t.start)  # the end of the file
        data = bytearray(weights.read_bytes())
        data[last.end - 4 : last.end] = np.array([bad], "<f4").tobytes()
        weights.write_bytes(bytes(data))

    return damage


def _damage_lora_type(root: Path) -> None:
    config = json.loads((root / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (root / "adapter_config.json").write_text(json.dumps(config))


BAD_ADAPTERS = {
    "not a PEFT LoRA dir": (_damage_not_peft, "not a PEFT LoRA adapter directory"),
    "not LoRA": (_damage_lora_type, "only LORA adapters"),
    "pickle weights": (_damage_pickle, "adapter_model.bin: refused, pickle weights are never loaded"),
    "corrupt safetensors": (_damage_corrupt, f"{WEIGHTS_FILE}: corrupt"),
    "truncated safetensors": (_damage_truncated, f"{WEIGHTS_FILE}: truncated"),
    "shapes disagree with config": (_damage_shapes, "but the config says r ="),
    "NaN weights": (_damage_values(float("nan")), "contains NaN or Inf"),
    "Inf weights": (_damage_values(float("-inf")), "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_changes_nothing(
    case: str, adapters: dict[str, Path], adapter_copy: Callable[[str], Path], snapshot: Callable[[], Any]
) -> None:
    add(adapters, "diagnosis")
    damage, message = BAD_ADAPTERS[case]
    root = adapter_copy("gastro")
    damage(root)
    before = snapshot()
    assert_one_line_error(invoke("add-expert", root, "--name", "gastro", "--group", "domain"), 1, message)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--name", "../evil"], 2, "expert name '../evil' looks like a path"),
        (["--name", "a/b"], 2, "looks like a path"),
        (["--name", "ok", "--domain", "x/y"], 2, "domain 'x/y' looks like a path"),
        (["--name", "ok", "--style", ".."], 2, "looks like a path"),
        (["--name", "ok", "--tag", "noequals"], 2, "is not KEY=VALUE"),
        (["--name", "ok", "--tag", "../k=v"], 2, "tag key '../k' looks like a path"),
    ],
)
def test_bad_names_are_refused_and_change_nothing(
    args: list[str], code: int, message: str, adapters: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    add(adapters, "diagnosis")
    before = snapshot()
    result = invoke("add-expert", adapters["gastro"], "--group", "domain", *args)
    assert_one_line_error(result, code, message)
    assert snapshot() == before


def test_unknown_group_is_refused_and_changes_nothing(adapters: dict[str, Path], snapshot: Callable[[], Any]) -> None:
    add(adapters, "diagnosis")
    before = snapshot()
    result = invoke("add-expert", adapters["gastro"], "--name", "g", "--group", "cardio")
    assert_one_line_error(result, 1, "unknown group 'cardio'")
    assert "atmoe-reg groups --add cardio" in result.stderr
    assert_one_line_error(
        invoke("add-expert", adapters["gastro"], "--name", "g", "--group", "../x"), 2, "looks like a path"
    )
    assert snapshot() == before


def test_missing_path_is_refused(tmp_path: Path, snapshot: Callable[[], Any]) -> None:
    ok("init")
    before = snapshot()
    assert_one_line_error(
        invoke("add-expert", tmp_path / "nope", "--name", "g", "--group", "domain"), 1, "no such directory"
    )
    assert snapshot() == before


# -- speed and imports ----------------------------------------------------------------------------------


def test_registry_commands_do_not_import_torch(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", None, "domain")
    code = (
        "import sys\n"
        "from atmoe.cli import main\n"
        f"for args in (['list'], ['show', 'gastro'], ['verify'], ['groups'], ['add-expert', {str(adapters['diagnosis'])!r}, '--name', 'd', '--group', 'functional']):\n"
        "    assert main(args, standalone_mode=False) in (None, 0), args\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr


def test_list_json_is_data_alone(adapters: dict[str, Path]) -> None:
    add(adapters, "gastro", None, "domain")
    result = ok("list", "--json")
    assert json.loads(result.stdout)[0]["digest"]
    assert result.stderr == ""
    assert json.loads(ok("groups", "--json").stdout)
    assert json.loads(ok("verify", "--json").stdout)["ok"] is True
    assert json.loads(ok("gc", "--json").stdout)["dry_run"] is True
    assert json.loads(ok("db", "current", "--json").stdout)["is_head"] is True


def test_plain_table_for_long_listings(adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from atmoe.cli import output

    add(adapters, "gastro", None, "domain")
    add(adapters, "diagnosis")
    monkeypatch.setattr(output, "PLAIN_TABLE_ROWS", 1)
    lines = ok("list").stdout.splitlines()
    assert lines[0].split()[:2] == ["REF", "GROUP"] and len(lines) == 3
    with Registry.open() as registry, registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Expert)) == 2
