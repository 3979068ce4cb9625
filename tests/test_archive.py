"""export / import: a round trip between two catalogs, reuse of identical experts, and refused archives.

The source catalog is always SQLite in its own home; the target is the test's registry (SQLite, or
PostgreSQL under ATMOE_TEST_PG=1), so import is exercised on both backends.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.experts import content_digest  # noqa: E402

Members = list[tuple[tarfile.TarInfo, bytes]]


def _source_cli(home: Path) -> Callable[..., Any]:
    """``run("add-expert", ...)``: the CLI on a second catalog (SQLite) in its own home."""
    options = ("--home", home, "--db", f"sqlite:///{home}/registry.db", "--store", home / "store")

    def run(*args: Any) -> Any:
        return ok(*options, *args)

    run.home = home  # type: ignore[attr-defined]
    return run


def _open_source(home: Path) -> Registry:
    return Registry.open(home, f"sqlite:///{home}/registry.db", home / "store")


@pytest.fixture(scope="module")
def source_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source catalog: five experts in three groups + general, gastro in two versions, medqa@1 with a router."""
    from safetensors.numpy import save

    from atmoe.registry.compositions import get_composition
    from atmoe.registry.routers import record_router, set_alias

    root = tmp_path_factory.mktemp("archive-source")
    source = _source_cli(root / "home")
    adapters = root / "adapters"
    for seed, (name, group) in enumerate(
        [("dx", "functional"), ("rx", "functional"), ("gastro", "domain"), ("terse", "style"), ("gen", "general")]
    ):
        source(
            "add-expert",
            write_adapter(adapters / name, seed=seed),
            "--name",
            name,
            "--group",
            group,
            "--tag",
            "team=gi",
            "--description",
            f"{name} expert",
        )
    source("add-expert", write_adapter(adapters / "gastro2", seed=99), "--name", "gastro", "--group", "domain")
    source("compose", "--name", "medqa", "--groups", "functional,domain,style", "--general", "gen")
    with _open_source(root / "home") as registry:
        blob = registry.store.put_bytes(save({"router.weight": np.ones((2, 3), np.float32)})).digest

        def work(session: Any) -> None:
            router = record_router(
                session,
                get_composition(session, "medqa"),
                blob_digest=blob,
                data_digest="d" * 64,
                eval_data_digest=None,
                hyperparameters={"lr": 0.1},
                metrics={"eval_loss": 1.5},
            )
            set_alias(session, "medqa", "prod", router)

        registry.transact(work)
    return root / "home"


@pytest.fixture
def populated(source_template: Path, tmp_path: Path) -> Callable[..., Any]:
    """A private copy of the source catalog (free to damage), as a CLI runner."""
    home = tmp_path / "source-home"
    shutil.copytree(source_template, home)
    return _source_cli(home)


def _members(path: Path) -> Members:
    with tarfile.open(path, "r:*") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def _write(path: Path, members: Members) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _manifest(members: Members) -> dict[str, Any]:
    return json.loads(dict((m.name, d) for m, d in members)["manifest.json"])


def _with_manifest(members: Members, manifest: dict[str, Any]) -> Members:
    data = json.dumps(manifest).encode()
    return [(m, data if m.name == "manifest.json" else d) for m, d in members]


def _replace_blob(members: Members, old: str, new_bytes: bytes) -> Members:
    """Swap a blob for other bytes and make the manifest consistent with them (a well-formed archive)."""
    import hashlib

    new = hashlib.sha256(new_bytes).hexdigest()
    manifest = _manifest(members)
    manifest["members"].pop(f"blobs/sha256/{old}")
    manifest["members"][f"blobs/sha256/{new}"] = {"sha256": new, "size": len(new_bytes)}
    for expert in manifest["experts"]:
        changed = False
        for file in expert["files"]:
            if file["sha256"] == old:
                file.update(sha256=new, size=len(new_bytes))
                changed = True
        if changed:
            old_digest = expert["digest"]
            expert["digest"] = content_digest((f["path"], f["sha256"]) for f in expert["files"])
            for composition in manifest["compositions"]:
                for pin in [*composition["members"], composition["general"]]:
                    if pin and pin["digest"] == old_digest:
                        pin["digest"] = expert["digest"]
    out: Members = []
    for info, data in members:
        if info.name == f"blobs/sha256/{old}":
            info = tarfile.TarInfo(f"blobs/sha256/{new}")
            data = new_bytes
        out.append((info, data))
    return _with_manifest(out, manifest)


# -- round trip ------------------------------------------------------------------------------------------


def test_round_trip_brings_the_composition_with_its_experts_and_routers(
    populated: Callable[..., Any], tmp_path: Path, snapshot: Callable[[], Any]
) -> None:
    archive = tmp_path / "medqa.tar.gz"
    report = json.loads(populated("export", "medqa", "--out", archive, "--json").stdout)
    assert report["compositions"] == ["medqa@1"] and report["routers"] == ["medqa@1:1"]
    # the composition pins gastro@2 (the latest), so gastro@1 stays behind
    assert report["experts"] == ["dx@1", "gastro@2", "gen@1", "rx@1", "terse@1"]
    assert not list(tmp_path.glob(".medqa.tar.gz.*"))  # no temp file left

    result = ok("import", archive)
    assert "experts 5 new" in result.stderr and "routers 1 new" in result.stderr
    assert "OK:" in ok("verify").stderr
    with Registry.open() as registry:
        record = registry.composition("medqa").to_dict()
        assert [(m["group"], m["slot"], m["ref"]) for m in record["experts"]] == [
            ("functional", 0, "dx@1"),
            ("functional", 1, "rx@1"),
            ("domain", 0, "gastro@1"),
            ("style", 0, "terse@1"),
        ]
        assert record["general"]["ref"] == "gen@1" and record["lambda"] == 0.5
        (router,) = [r.to_dict() for r in registry.routers("medqa")]
        assert router["aliases"] == ["prod"] and router["metrics"] == {"eval_loss": 1.5}
        gastro = registry.get_expert("gastro")
        with _open_source(populated.home) as src:  # type: ignore[attr-defined]
            original = src.get_expert("gastro@2")
        assert (gastro.digest, gastro.tags, gastro.description) == (
            original.digest,
            original.tags,
            original.description,
        )
        assert registry.get_expert("dx").tags == {"team": "gi"} and registry.get_expert("dx").description == "dx expert"
        assert gastro.module_ranks == original.module_ranks and gastro.created_at is not None
    # build-ready: composing the same spec in the target finds the imported version
    again = json.loads(
        ok("compose", "--name", "medqa", "--groups", "functional,domain,style", "--general", "gen", "--json").stdout
    )
    assert (again["version"], again["created"]) == (1, False)

    before = snapshot()
    second = json.loads(ok("import", archive, "--json").stdout)
    assert second["experts_added"] == [] and len(second["experts_existing"]) == 5
    assert second["compositions_added"] == [] and second["routers_added"] == []
    assert snapshot() == before  # importing twice changes nothing


def test_new_content_under_a_known_name_becomes_the_next_version(populated: Callable[..., Any], tmp_path: Path) -> None:
    ok("add-expert", write_adapter(tmp_path / "local", seed=1234), "--name", "gastro", "--group", "domain")
    archive = tmp_path / "gastro.tar"
    report = json.loads(populated("export", "gastro", "--out", archive, "--json").stdout)
    assert report["experts"] == ["gastro@1", "gastro@2"] and report["compositions"] == []
    result = json.loads(ok("import", archive, "--json").stdout)
    assert result["experts_added"] == ["gastro@1 -> gastro@2", "gastro@2 -> gastro@3"]
    assert [e.ref for e in Registry.open().list_experts()] == ["gastro@1", "gastro@2", "gastro@3"]


def test_export_single_versions_and_everything(populated: Callable[..., Any], tmp_path: Path) -> None:
    one = json.loads(populated("export", "gastro@1", "--out", tmp_path / "one.tar", "--json").stdout)
    assert one["experts"] == ["gastro@1"] and one["blobs"] == 2
    everything = json.loads(populated("export", "--all", "--out", tmp_path / "all.tar", "--json").stdout)
    assert len(everything["experts"]) == 6 and everything["compositions"] == ["medqa@1"]
    dry = json.loads(ok("import", tmp_path / "all.tar", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and len(dry["experts_added"]) == 6
    assert invoke("list", "--json").stdout.strip() == "[]"  # a dry run writes nothing


def test_export_refuses_an_altered_blob_and_leaves_no_file(populated: Callable[..., Any], tmp_path: Path) -> None:
    with _open_source(populated.home) as registry:  # type: ignore[attr-defined]
        weights = next(f for f in registry.get_expert("dx").files if f.path == "adapter_model.safetensors")
        blob = registry.store.path_for(weights.sha256)
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.write_bytes(bytes(data))
    home = populated.home  # type: ignore[attr-defined]
    result = invoke(
        "--home",
        home,
        "--db",
        f"sqlite:///{home}/registry.db",
        "--store",
        home / "store",
        "export",
        "dx",
        "--out",
        tmp_path / "dx.tar",
    )
    assert_one_line(result, 1, "is altered on disk")
    assert not list(tmp_path.glob("*dx.tar*"))


def test_export_of_an_unknown_name_is_one_line(populated: Callable[..., Any], tmp_path: Path) -> None:
    home = populated.home  # type: ignore[attr-defined]
    options = ("--home", home, "--db", f"sqlite:///{home}/registry.db", "--store", home / "store")
    assert_one_line(invoke(*options, "export", "nobody", "--out", tmp_path / "x.tar"), 1, "names no expert")
    assert_one_line(invoke(*options, "export", "--out", tmp_path / "x.tar"), 2, "--all")
    assert_one_line(invoke(*options, "export", "../x", "--out", tmp_path / "x.tar"), 2, "looks like a path")


# -- refused archives ------------------------------------------------------------------------------------------


def _link(kind: bytes, name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _nan_weights(members: Members) -> Members:
    from atmoe.registry.validate import WEIGHTS_FILE

    manifest = _manifest(members)
    expert = next(e for e in manifest["experts"] if e["name"] == "dx")
    digest = next(f["sha256"] for f in expert["files"] if f["path"] == WEIGHTS_FILE)
    data = bytearray(dict((m.name, d) for m, d in members)[f"blobs/sha256/{digest}"])
    data[-4:] = np.array([np.nan], "<f4").tobytes()
    return _replace_blob(members, digest, bytes(data))


def _altered_member(members: Members) -> Members:
    out = []
    for info, data in members:
        if info.name.startswith("blobs/") and not out[1:]:
            data = data[:-1] + bytes([data[-1] ^ 1])
        out.append((info, data))
    return out


def _manifest_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Members], Members]:
    def mutate(members: Members) -> Members:
        manifest = _manifest(members)
        edit(manifest)
        return _with_manifest(members, manifest)

    return mutate


def _device(members: Members) -> Members:
    info = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    info.type = tarfile.CHRTYPE
    return [*members, (info, b"")]


BAD_ARCHIVES: dict[str, tuple[Callable[[Members], Members], list[str], str]] = {
    "absolute path": (lambda m: [*m, _file("/etc/cron.d/evil")], [], "has an absolute path"),
    "dot-dot": (lambda m: [*m, _file("blobs/../../evil")], [], "has a '..' component"),
    "symlink": (lambda m: [*m, _link(tarfile.SYMTYPE, "blobs/sha256/" + "1" * 64, "/etc/passwd")], [], "is a link"),
    "hardlink": (lambda m: [*m, _link(tarfile.LNKTYPE, "blobs/sha256/" + "2" * 64, "manifest.json")], [], "is a link"),
    "device": (_device, [], "is a device"),
    "too many members": (lambda m: m, ["--max-members", "3"], "more than 3 members"),
    "too large member": (lambda m: m, ["--max-member-size", "100"], "more than the limit of 100"),
    "unexpected member": (lambda m: [*m, _file("notes.txt")], [], "unexpected member 'notes.txt'"),
    "duplicate member": (lambda m: [*m, m[-1]], [], "appears twice"),
    "member altered": (_altered_member, [], "is altered"),
    "no manifest": (lambda m: [x for x in m if x[0].name != "manifest.json"], [], "no manifest.json"),
    "manifest not JSON": (
        lambda m: [(i, b"{nope" if i.name == "manifest.json" else d) for i, d in m],
        [],
        "not valid JSON",
    ),
    "unknown format version": (_manifest_edit(lambda d: d.update(format_version=99)), [], "upgrade atmoe-registry"),
    "unlisted blob": (_manifest_edit(lambda d: d["members"].popitem()), [], "does not list"),
    "path-like expert name": (_manifest_edit(lambda d: d["experts"][0].update(name="../x")), [], "looks like a path"),
    "file name with a slash": (
        _manifest_edit(lambda d: d["experts"][0]["files"][0].update(path="../adapter_config.json")),
        [],
        "plain",
    ),
    "expert digest mismatch": (_manifest_edit(lambda d: d["experts"][0].update(digest="f" * 64)), [], "content digest"),
    "NaN weights": (_nan_weights, [], "contains NaN or Inf"),
    "pin to a missing expert": (
        _manifest_edit(lambda d: d["compositions"][0]["members"][0].update(version=7)),
        [],
        "does not hold",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archive_is_refused_and_changes_nothing(
    case: str, populated: Callable[..., Any], tmp_path: Path, snapshot: Callable[[], Any]
) -> None:
    good = tmp_path / "good.tar"
    populated("export", "medqa", "--out", good)
    mutate, options, fragment = BAD_ARCHIVES[case]
    bad = _write(tmp_path / "bad.tar", mutate(_members(good)))
    ok("add-expert", write_adapter(tmp_path / "local", seed=7), "--name", "local", "--group", "domain")
    before = snapshot()
    assert_one_line(invoke("import", bad, *options), 1, fragment)
    assert snapshot() == before


def test_not_a_tar_file_and_a_truncated_one(
    populated: Callable[..., Any], tmp_path: Path, snapshot: Callable[[], Any]
) -> None:
    good = tmp_path / "good.tar.gz"
    populated("export", "medqa", "--out", good)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ok("init")
    before = snapshot()
    assert_one_line(invoke("import", junk), 1, "not a readable tar archive")
    assert_one_line(invoke("import", truncated), 1, "archive")
    assert_one_line(invoke("import", tmp_path / "missing.tar"), 1, "no such file")
    assert_one_line(invoke("import", good, "--max-member-size", "lots"), 2, "--max-member-size")
    assert snapshot() == before


def test_import_never_extracts_to_the_filesystem(
    populated: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.tar"
    populated("export", "medqa", "--out", good)

    def forbidden(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("import must not extract members to the filesystem")

    monkeypatch.setattr(tarfile.TarFile, "extractall", forbidden)
    monkeypatch.setattr(tarfile.TarFile, "extract", forbidden)
    ok("import", good)
    assert "OK:" in ok("verify").stderr
