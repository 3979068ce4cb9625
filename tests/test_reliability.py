"""Reliability round 2, one test per class of bug (SQLite, or PostgreSQL under ATMOE_TEST_PG=1):
damaged blobs are healed by good bytes, links and special files are never followed or read, an
expert's versions stay in one group, ``--json`` is always JSON, and hostile JSON fails in one line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402


def _blob(registry: Registry, name: str, path: str = WEIGHTS_FILE) -> Path:
    digest = next(f.sha256 for f in registry.get_expert(name).files or () if f.path == path)
    return registry.store.path_for(digest)


def _damage_same_size(blob: Path) -> None:
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("heal_by", ["add-expert", "import"])
def test_a_same_size_corruption_is_healed_by_a_good_copy(tmp_path, heal_by):
    adapter = write_adapter(tmp_path / "a", seed=1)
    ok("add-expert", adapter, "--name", "x", "--group", "functional")
    archive = tmp_path / "x.tar"
    ok("export", "x", "--out", archive)
    with Registry.open() as registry:
        blob = _blob(registry, "x")
    _damage_same_size(blob)
    assert_one_line(invoke("verify"), 1, "altered on disk")
    if heal_by == "add-expert":
        result = ok("add-expert", adapter, "--name", "x", "--group", "functional")
        assert "already x@1" in result.stderr  # still no new version
    else:
        ok("import", archive)
    assert "OK:" in ok("verify").stderr


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_links_and_special_files_in_an_adapter_folder_are_refused(tmp_path, kind):
    adapter = write_adapter(tmp_path / "a", seed=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    if kind == "symlink":
        (adapter / "notes.txt").symlink_to(secret)
    else:
        os.mkfifo(adapter / "notes.txt")
    line = assert_one_line(invoke("add-expert", adapter, "--name", "x", "--group", "functional"), 1, "notes.txt")
    assert "symbolic link" in line or "not a regular file" in line
    with Registry.open() as registry:
        assert registry.list_experts() == []
        assert list(registry.store.iter_digests()) == []


def test_a_weights_file_that_is_a_link_is_refused_too(tmp_path):
    adapter = write_adapter(tmp_path / "a", seed=3)
    real = tmp_path / "elsewhere.safetensors"
    (adapter / WEIGHTS_FILE).rename(real)
    (adapter / WEIGHTS_FILE).symlink_to(real)
    assert_one_line(invoke("add-expert", adapter, "--name", "x", "--group", "functional"), 1, "symbolic link")


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_a_special_file_in_place_of_a_blob_fails_verify_and_builds_at_once(tmp_path, kind):
    adapter = write_adapter(tmp_path / "a", seed=4)
    ok("add-expert", adapter, "--name", "x", "--group", "functional")
    with Registry.open() as registry:
        blob = _blob(registry, "x")
        blob.unlink()
        if kind == "fifo":
            os.mkfifo(blob)
        else:
            blob.symlink_to("/dev/zero")
        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(problems=registry.verify()), daemon=True)
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "verify hangs on a special file"
        assert any("not a regular file" in str(p) for p in outcome["problems"])
        from atmoe.errors import ChecksumMismatch

        with pytest.raises(ChecksumMismatch, match="not a regular file"):
            registry.store.open_verified(blob.parent.name + blob.name)


def test_a_new_version_cannot_move_to_another_group(tmp_path):
    ok("add-expert", write_adapter(tmp_path / "a", seed=5), "--name", "e", "--group", "functional")
    assert_one_line(
        invoke("add-expert", write_adapter(tmp_path / "b", seed=6), "--name", "e", "--group", "domain"),
        1,
        "expert 'e' is in group 'functional'",
    )
    with Registry.open() as registry:
        assert [(e.ref, e.group) for e in registry.list_experts()] == [("e@1", "functional")]
    ok("add-expert", write_adapter(tmp_path / "c", seed=7), "--name", "e", "--group", "functional")  # same group: fine


def test_json_output_never_holds_nan_or_infinity(monkeypatch, capsys):
    from atmoe.cli import output

    output.print_json({"loss": float("nan"), "runs": [1.0, float("inf")], "ok": 0.5})
    text = capsys.readouterr().out
    assert json.loads(text) == {"loss": None, "runs": [1.0, None], "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text
    output.print_json([{"x": float("-inf")}] * (output.PLAIN_TABLE_ROWS + 1))
    assert all(row == {"x": None} for row in json.loads(capsys.readouterr().out))


@pytest.mark.parametrize(
    "text",
    ['{"r": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000, '{"lora_alpha": NaN}', "\udcff"],
    ids=["a 5000-digit integer", "100k-deep nesting", "NaN", "not UTF-8"],
)
def test_hostile_json_fails_in_one_line_everywhere(tmp_path, text):
    from atmoe.data import read_examples
    from atmoe.errors import AtmoeError

    raw = text.encode("utf-8", "surrogateescape")
    adapter = write_adapter(tmp_path / "a", seed=8)
    (adapter / CONFIG_FILE).write_bytes(raw)
    assert_one_line(invoke("add-expert", adapter, "--name", "x", "--group", "functional"), 1, CONFIG_FILE)
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n' + raw + b"\n")
    with pytest.raises(AtmoeError, match=r"train.jsonl(:2: invalid JSON|: not UTF-8)") as caught:
        read_examples(data)
    assert "\n" not in str(caught.value)


def test_catalog_text_reaches_the_terminal_as_text_never_markup_or_escapes(tmp_path):
    """A tag '[/bold]' crashed `list` for the whole catalog; ESC/OSC sequences reached the terminal."""
    hostile = "[/bold]\x1b]0;owned\x07\x1b[31mred"
    ok("add-expert", write_adapter(tmp_path / "a", seed=9), "--name", "x", "--group", "functional",
       "--tag", f"note={hostile}", "--description", hostile)  # fmt: skip
    for args in (("list",), ("show", "x"), ("groups",)):
        result = ok(*args)
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    shown = ok("show", "x").stdout
    assert "[/bold]" in shown and "\\x1b" in shown  # the text itself, visibly escaped
    record = json.loads(ok("show", "x", "--json").stdout)  # --json stays exact
    assert record["description"] == hostile and record["tags"] == {"note": hostile}


def test_plain_escapes_control_characters_and_leaves_markup_as_text():
    from atmoe.cli.output import plain

    assert plain("a[/bold]\x1b[2Jb\tc\n") == "a[/bold]\\x1b[2Jb\tc\n"
    assert plain("\x9b31m") == "\\x9b31m"  # C1 control characters too


def test_gc_refuses_a_store_that_is_not_its_catalogs(tmp_path, monkeypatch):
    """A second home whose ATMOE_STORE points at the first home's store: gc --apply there would
    delete every blob of the first catalog."""
    ok("add-expert", write_adapter(tmp_path / "a", seed=10), "--name", "x", "--group", "functional")
    with Registry.open() as first:
        store = first.store.root
        blobs = sorted(first.store.iter_digests())
    other = tmp_path / "other-home"
    other.mkdir()
    (other / "store").mkdir()
    second = ("--home", other, "--db", f"sqlite:///{other / 'registry.db'}")  # a catalog of its own
    ok(*second, "init")  # with its own (marked) store
    import shutil

    shutil.rmtree(other / "store")
    (other / "store").symlink_to(store)  # now its store is the first catalog's
    line = assert_one_line(invoke(*second, "gc", "--apply", "--grace", "0"), 1, "belongs to catalog")
    assert "would delete" in line
    with Registry.open() as first:
        assert sorted(first.store.iter_digests()) == blobs and first.verify() == []


def test_a_deleted_database_is_not_silently_recreated_over_a_full_store(tmp_path, sqlite_only):
    ok("add-expert", write_adapter(tmp_path / "a", seed=11), "--name", "x", "--group", "functional")
    with Registry.open() as first:
        database, blobs = first.home / "registry.db", sorted(first.store.iter_digests())
    database.unlink()
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    assert_one_line(invoke("gc", "--apply", "--grace", "0"), 1, "is new, but the store")
    assert not database.exists()  # nothing was created
    from atmoe.registry.store import BlobStore

    assert sorted(BlobStore(database.parent / "store").iter_digests()) == blobs


def _exported(tmp_path: Path) -> tuple[Path, dict]:
    ok("add-expert", write_adapter(tmp_path / "a", seed=12), "--name", "x", "--group", "functional")
    archive = tmp_path / "x.tar"
    ok("export", "x", "--out", archive)
    import tarfile

    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name != "manifest.json"}
    return archive, {"manifest": manifest, "blobs": blobs}


def _write_archive(path: Path, manifest: dict | bytes, blobs: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        for name, payload in [("manifest.json", data), *blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _fresh_target(tmp_path: Path) -> tuple[str, ...]:
    target = tmp_path / "target"
    return ("--home", target, "--db", f"sqlite:///{target / 'registry.db'}")


def test_import_stores_only_the_blobs_its_rows_reference(tmp_path):
    import hashlib

    _, parts = _exported(tmp_path)
    padding = {}
    for i in range(50):  # members nothing references: checked, never stored
        payload = f"padding {i}".encode()
        digest = hashlib.sha256(payload).hexdigest()
        padding[f"blobs/sha256/{digest}"] = payload
        parts["manifest"]["members"][f"blobs/sha256/{digest}"] = {"sha256": digest, "size": len(payload)}
    archive = _write_archive(tmp_path / "padded.tar", parts["manifest"], {**parts["blobs"], **padding})
    target = _fresh_target(tmp_path)
    ok(*target, "import", archive)
    from atmoe.registry.store import BlobStore

    stored = set(BlobStore(tmp_path / "target" / "store").iter_digests())
    assert stored == {name.rsplit("/", 1)[1] for name in parts["blobs"]}


def test_import_bounds_the_uncompressed_total_and_the_manifest(tmp_path):
    archive, parts = _exported(tmp_path)
    target = _fresh_target(tmp_path)
    assert_one_line(invoke(*target, "import", archive, "--max-total-size", "1k"), 1, "--max-total-size")
    bomb = b'{"format": "atmoe-archive", "pad": [' + b"{}," * 2_500_000 + b"{}]}"
    bombed = _write_archive(tmp_path / "bomb.tar", bomb, {})
    assert_one_line(invoke(*target, "import", bombed), 1, "JSON objects and lists")
    assert not (tmp_path / "target" / "store" / "sha256").exists() or not any(
        (tmp_path / "target" / "store" / "sha256").iterdir()
    )


def test_import_refuses_what_the_database_would_refuse_before_any_blob_is_written(tmp_path):
    _, parts = _exported(tmp_path)
    parts["manifest"]["experts"][0]["description"] = "nul \x00 inside"
    archive = _write_archive(tmp_path / "nul.tar", parts["manifest"], parts["blobs"])
    target = _fresh_target(tmp_path)
    assert_one_line(invoke(*target, "import", archive), 1, "NUL")
    from atmoe.registry.store import BlobStore

    assert list(BlobStore(tmp_path / "target" / "store").iter_digests()) == []


def test_compositions_can_be_removed_with_their_routers_then_their_experts(tmp_path):
    ok("add-expert", write_adapter(tmp_path / "a", seed=13), "--name", "dx", "--group", "functional")
    ok("compose", "--name", "med", "--groups", "functional")
    with Registry.open() as registry:
        from atmoe.registry.compositions import get_composition
        from atmoe.registry.routers import record_router, set_alias

        blob = registry.store.put_bytes(b"router weights")

        def add_router(session):
            router = record_router(session, get_composition(session, "med"), blob_digest=blob.digest,
                                   data_digest=None, eval_data_digest=None, hyperparameters={}, metrics={})  # fmt: skip
            set_alias(session, "med", "prod", router)

        registry.transact(add_router, blobs={blob.digest: lambda: None})
    assert_one_line(invoke("remove", "dx"), 1, "pinned by composition med@1")
    assert_one_line(invoke("compositions", "remove", "med"), 1, "alias prod points at a router")
    ok("compositions", "remove", "med", "--force")
    with Registry.open() as registry:
        assert registry.compositions() == [] and registry.verify() == []
    ok("remove", "dx")  # nothing pins it any more
    report = json.loads(ok("gc", "--apply", "--grace", "0", "--json").stdout)
    assert blob.digest in {b["digest"] for b in report["blobs"]}
    assert_one_line(invoke("compositions", "remove", "med"), 1, "no composition med")


@pytest.mark.parametrize(("umask", "blob", "database"), [(0o077, 0o400, 0o600), (0o002, 0o444, 0o664)])
def test_blobs_and_the_database_follow_the_umask(tmp_path, sqlite_only, umask, blob, database):
    """Blobs were always 0444 (world-readable under umask 077), and registry.db never group-writable."""
    adapter = write_adapter(tmp_path / "a", seed=14)
    previous = os.umask(umask)
    try:
        ok("add-expert", adapter, "--name", "x", "--group", "functional")
    finally:
        os.umask(previous)
    with Registry.open() as registry:
        path = _blob(registry, "x")
        assert path.stat().st_mode & 0o777 == blob
        assert (registry.home / "registry.db").stat().st_mode & 0o777 == database


def test_a_hub_id_from_catalog_data_never_reaches_the_network_unless_allowed(monkeypatch, tmp_path):
    import transformers

    from atmoe.errors import ModelLoadError
    from atmoe.loading import load_base_model

    seen: list[dict] = []

    def from_pretrained(location, **kwargs):
        seen.append(kwargs)
        raise OSError("not in the local cache")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    for name in ("ATMOE_ALLOW_DOWNLOADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ModelLoadError, match="downloads are off: pass --allow-downloads"):
        load_base_model("someorg/some-model")
    assert seen == []  # not in the cache (read from disk alone): transformers is never asked
    monkeypatch.setenv("ATMOE_ALLOW_DOWNLOADS", "1")
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_base_model("someorg/some-model")
    assert "local_files_only" not in seen[-1]


def test_import_refuses_values_longer_than_the_catalogs_columns_before_writing(tmp_path):
    _, parts = _exported(tmp_path)
    parts["manifest"]["experts"][0]["base_model"] = "m" * 600  # the column holds 512
    archive = _write_archive(tmp_path / "long.tar", parts["manifest"], parts["blobs"])
    target = _fresh_target(tmp_path)
    assert_one_line(invoke(*target, "import", archive), 1, "at most 512 characters")
    from atmoe.registry.store import BlobStore

    assert list(BlobStore(tmp_path / "target" / "store").iter_digests()) == []
