"""Every bad input of DESIGN.md section 5 gets its exit code, one line on stderr, and changes nothing.

Each case runs the real command on a populated catalog and asserts three things: the exit code (2 for
a malformed value the user typed, 1 for any other refusal); exactly one line on stderr (``Error: ...``,
or ``Warning: ...`` for the network filesystem) and no traceback; and a registry left unchanged (row
counts of every table and the list of files in the store, before and after). The cases of one
category share one catalog, since none may change it; each failure names its case.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))
from store_tools import rewrite_blob  # noqa: E402
from synthetic_lora import invoke, ok, write_adapter  # noqa: E402

from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE, read_safetensors_header  # noqa: E402

Case = tuple[str, Sequence[Any], int, str]  # (label, argv, exit code, fragment of the message)
TRIED: dict[str, int] = {}  # category -> cases tried (printed with -s, for the note)


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, Any]:
    """dx, rx (functional), gastro (domain), terse (style), alien (group extra, another base model),
    an empty group, composition med@1 (functional, domain) with router 1, and a good archive of it."""
    from safetensors.numpy import save

    from atmoe.registry.compositions import get_composition
    from atmoe.registry.routers import record_router

    adapters = tmp_path / "adapters"
    for seed, (name, group) in enumerate(
        [("dx", "functional"), ("rx", "functional"), ("gastro", "domain"), ("terse", "style")]
    ):
        ok("add-expert", write_adapter(adapters / name, seed=seed), "--name", name, "--group", group)
    ok("groups", "--add", "extra")
    ok("groups", "--add", "empty")
    ok(
        "add-expert",
        write_adapter(adapters / "alien", seed=9, base_model="other/base"),
        "--name",
        "alien",
        "--group",
        "extra",
    )
    ok("compose", "--name", "med", "--groups", "functional,domain")
    with Registry.open() as registry:
        blob = registry.store.put_bytes(save({"router.weight": np.zeros((2, 2), np.float32)})).digest
        registry.transact(
            lambda s: record_router(
                s,
                get_composition(s, "med"),
                blob_digest=blob,
                data_digest=None,
                eval_data_digest=None,
                hyperparameters={},
                metrics={},
            )
        )
    archive = tmp_path / "med.tar"
    ok("export", "med", "--out", archive)
    return {"root": tmp_path, "adapters": adapters, "archive": archive}


def _run_cases(category: str, cases: Sequence[Case], snapshot: Callable[[], Any], *, prefix: str = "Error: ") -> None:
    before = snapshot()
    for label, args, code, fragment in cases:
        result = invoke(*args)
        where = f"[{category}: {label}]"
        assert result.exit_code == code, (where, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (where, result.stderr)
        assert lines[0].startswith(prefix) and fragment in lines[0], (where, lines[0])
        assert "Traceback" not in result.output, where
        assert snapshot() == before, where
    TRIED[category] = TRIED.get(category, 0) + len(cases)
    print(f"bad input, {category}: {len(cases)} cases")


# -- adapters -----------------------------------------------------------------------------------------------


def _damaged(catalog: dict[str, Any], label: str, damage: Callable[[Path], None]) -> Path:
    root = catalog["root"] / "damaged" / label.replace(" ", "-").replace("/", "-")
    shutil.copytree(catalog["adapters"] / "gastro", root)
    damage(root)
    return root


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        config = json.loads((root / CONFIG_FILE).read_text())
        config.update(changes)
        (root / CONFIG_FILE).write_text(json.dumps(config))

    return damage


def _edit_weights(edit: Callable[[bytearray], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = bytearray((root / WEIGHTS_FILE).read_bytes())
        edit(data)
        (root / WEIGHTS_FILE).write_bytes(bytes(data))

    return damage


def _last_value(value: float) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        header = read_safetensors_header(root / WEIGHTS_FILE)
        end = max(t.end for t in header.tensors.values())
        _edit_weights(lambda d: d.__setitem__(slice(end - 4, end), np.array([value], "<f4").tobytes()))(root)

    return damage


def _rank_mismatch(root: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 16), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((16, 3), np.float32),
    }
    save_file(tensors, str(root / WEIGHTS_FILE))


ADAPTER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "not a PEFT LoRA dir": (lambda r: (r / CONFIG_FILE).unlink(), "not a PEFT LoRA adapter directory"),
    "config not JSON": (lambda r: (r / CONFIG_FILE).write_text("{r: 4"), "is not valid JSON"),
    "not a LoRA (IA3)": (_edit_config(peft_type="IA3"), "only LORA adapters"),
    "rank not a number": (_edit_config(r="four"), "r must be a positive integer"),
    "DoRA config without magnitudes": (
        _edit_config(use_dora=True),
        "no lora_magnitude_vector but the config sets use_dora",
    ),
    "pickle weights beside": (
        lambda r: (r / "adapter_model.bin").write_bytes(b"\x80\x04pickle"),
        "pickle weights are never loaded",
    ),
    "pickle weights only": (
        lambda r: (r / WEIGHTS_FILE).rename(r / "adapter_model.pt"),
        "pickle weights are never loaded",
    ),
    "no weights": (lambda r: (r / WEIGHTS_FILE).unlink(), "only safetensors LoRA weights"),
    "corrupt safetensors header": (_edit_weights(lambda d: d.__setitem__(slice(8, 16), b"\xff" * 8)), "corrupt"),
    "huge header length": (
        _edit_weights(lambda d: d.__setitem__(slice(0, 8), (2**40).to_bytes(8, "little"))),
        "corrupt",
    ),
    "truncated safetensors": (_edit_weights(lambda d: d.__delitem__(slice(len(d) - 100, len(d)))), "truncated"),
    "empty safetensors": (lambda r: (r / WEIGHTS_FILE).write_bytes(b""), "truncated"),
    "shapes disagree with r": (_edit_config(r=8), "but the config says r = 8"),
    "shapes disagree with rank_pattern": (_edit_config(rank_pattern={"q_proj": 2}), "rank_pattern"),
    "lora_A and lora_B disagree": (_rank_mismatch, "disagree on the rank"),
    "NaN weights": (_last_value(float("nan")), "contains NaN or Inf"),
    "Inf weights": (_last_value(float("inf")), "contains NaN or Inf"),
    "-Inf weights": (_last_value(float("-inf")), "contains NaN or Inf"),
}


def test_bad_adapters(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    cases: list[Case] = [
        (label, ("add-expert", _damaged(catalog, label, damage), "--name", "gastro", "--group", "domain"), 1, fragment)
        for label, (damage, fragment) in ADAPTER_DAMAGE.items()
    ]
    not_a_dir = catalog["root"] / "file.safetensors"
    not_a_dir.write_bytes(b"x")
    cases += [
        (
            "a file, not a directory",
            ("add-expert", not_a_dir, "--name", "g", "--group", "domain"),
            1,
            "not a directory",
        ),
        (
            "no such path",
            ("add-expert", catalog["root"] / "nope", "--name", "g", "--group", "domain"),
            1,
            "no such directory",
        ),
    ]
    _run_cases("adapters", cases, snapshot)


# -- groups and compositions ------------------------------------------------------------------------------------


def test_bad_groups_and_compositions(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    gastro = catalog["adapters"] / "gastro"
    compose = ("compose", "--name", "x", "--groups")
    cases: list[Case] = [
        (
            "unknown group (add-expert)",
            ("add-expert", gastro, "--name", "g", "--group", "cardio"),
            1,
            "unknown group 'cardio'",
        ),
        ("unknown group (compose)", (*compose, "functional,cardio"), 1, "unknown group 'cardio'"),
        ("empty group", (*compose, "functional,empty"), 1, "group 'empty' has no experts"),
        ("different base models", (*compose, "functional,extra"), 1, "different base models"),
        ("duplicate expert", (*compose, "functional", "--expert", "dx", "--expert", "dx"), 1, "duplicate expert 'dx'"),
        (
            "duplicate expert, two versions",
            (*compose, "functional", "--expert", "dx@1", "--expert", "dx@latest"),
            1,
            "duplicate expert",
        ),
        ("member also general", (*compose, "functional", "--general", "dx"), 1, "duplicate expert 'dx'"),
        (
            "expert outside the groups",
            (*compose, "functional", "--expert", "gastro"),
            1,
            "which --groups does not list",
        ),
        ("unknown expert", (*compose, "functional", "--expert", "nobody"), 1, "no expert named 'nobody'"),
        ("group listed twice", (*compose, "functional,functional"), 2, "lists a group twice"),
        ("lambda out of range", (*compose, "functional", "--lambda", "2"), 2, "--lambda"),
        ("lambda without general", (*compose, "functional", "--lambda", "0.5"), 2, "needs a --general"),
        ("temperature zero", (*compose, "functional", "--temperature", "0"), 2, "--temperature"),
        ("unknown composition", ("compositions", "show", "nothing"), 1, "no composition nothing"),
        ("unknown router", ("route", "med:7", "hi"), 1, "has no router 7"),
        ("unknown alias", ("route", "med:prod", "hi"), 1, "no router alias 'prod'"),
    ]
    _run_cases("groups and compositions", cases, snapshot)


# -- names that look like paths ----------------------------------------------------------------------------------


def test_names_that_look_like_paths(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    gastro = catalog["adapters"] / "gastro"
    cases: list[Case] = [
        (f"{what} {name!r}", args, 2, "looks like a path")
        for name in ("../evil", "a/b", "..", "a\\b", "/abs")
        for what, args in (
            ("expert name", ("add-expert", gastro, "--name", name, "--group", "domain")),
            ("group of add-expert", ("add-expert", gastro, "--name", "g", "--group", name)),
            ("composition name", ("compose", "--name", name, "--groups", "functional")),
            ("group", ("groups", "--add", name)),
            ("reference", ("show", name)),
            ("alias", ("alias", "med:1", name)),
        )
    ]
    cases += [
        (
            "domain",
            ("add-expert", gastro, "--name", "g", "--group", "domain", "--domain", "x/y"),
            2,
            "looks like a path",
        ),
        ("style", ("add-expert", gastro, "--name", "g", "--group", "domain", "--style", ".."), 2, "looks like a path"),
        (
            "tag key",
            ("add-expert", gastro, "--name", "g", "--group", "domain", "--tag", "../k=v"),
            2,
            "looks like a path",
        ),
        ("too long", ("add-expert", gastro, "--name", "n" * 65, "--group", "domain"), 2, "longer than 64"),
        ("bad characters", ("add-expert", gastro, "--name", "a b", "--group", "domain"), 2, "is not valid"),
    ]
    _run_cases("names", cases, snapshot)


# -- archives --------------------------------------------------------------------------------------------------------


def _archive_with(catalog: dict[str, Any], label: str, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    out = catalog["root"] / f"bad-{label.replace(' ', '-')}.tar"
    with tarfile.open(catalog["archive"]) as good, tarfile.open(out, "w") as bad:
        for member in good:
            bad.addfile(member, good.extractfile(member))
        extra.size = len(data) if extra.isreg() else 0
        bad.addfile(extra, io.BytesIO(data) if extra.isreg() else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_bad_archives(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    blob = "blobs/sha256/" + "3" * 64
    bad = {
        "absolute path": (_member("/tmp/evil"), "has an absolute path"),
        "dot-dot": (_member("blobs/../../../evil"), "has a '..' component"),
        "symlink": (_member(blob, tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        "hardlink": (_member(blob, tarfile.LNKTYPE, "manifest.json"), "is a link"),
        "character device": (_member(blob, tarfile.CHRTYPE), "is a device"),
        "fifo": (_member(blob, tarfile.FIFOTYPE), "is a device or fifo"),
    }
    cases: list[Case] = [
        (label, ("import", _archive_with(catalog, label, member, b"x")), 1, fragment)
        for label, (member, fragment) in bad.items()
    ]
    members = len(tarfile.open(catalog["archive"]).getnames())
    cases += [
        (
            "too many members",
            ("import", catalog["archive"], "--max-members", members - 1),
            1,
            f"more than {members - 1} members",
        ),
        (
            "too large member",
            ("import", catalog["archive"], "--max-member-size", "1k"),
            1,
            "more than the limit of 1024",
        ),
        ("not an archive", ("import", catalog["adapters"] / "gastro" / CONFIG_FILE), 1, "not a readable tar archive"),
    ]
    _run_cases("archives", cases, snapshot)


# -- training data, forced routing -----------------------------------------------------------------------------------


def test_malformed_training_data_and_forced_weights(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    good = json.dumps({"prompt": "p", "response": "r"})
    files = {
        "invalid JSON": [good, "{nope", good],
        "missing response": [good, good, json.dumps({"prompt": "p"})],
        "not an object": [good, "[1, 2]"],
        "intents not a list": [good, json.dumps({"prompt": "p", "response": "r", "intents": "dx"})],
    }
    cases: list[Case] = []
    for label, lines in files.items():
        path = catalog["root"] / f"{label.replace(' ', '-')}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        line = next(i for i, raw in enumerate(lines, 1) if raw != good)
        cases.append((f"data: {label}", ("train-router", "med", "--data", path), 1, f"{path.name}:{line}:"))
    cases += [
        ("data: no such file", ("train-router", "med", "--data", catalog["root"] / "none.jsonl"), 1, "no such file"),
        (
            "schedule: unknown",
            ("train-router", "med", "--data", catalog["root"] / "none.jsonl", "--schedule", "step"),
            2,
            "--schedule",
        ),
        (
            "warm-up: whole run",
            ("train-router", "med", "--data", catalog["root"] / "none.jsonl", "--warmup-ratio", "1"),
            2,
            "--warmup-ratio must be >= 0 and < 1",
        ),
        ("force: unknown expert", ("route", "med", "hi", "--force", "nobody=1"), 2, "not an expert of med@1"),
        ("force: negative weight", ("route", "med", "hi", "--force", "dx=-1"), 2, ">= 0"),
        ("force: not finite", ("route", "med", "hi", "--force", "dx=inf"), 2, "finite"),
        ("force: not a number", ("route", "med", "hi", "--force", "dx=lots"), 2, "is not a number"),
        ("force: no weight", ("route", "med", "hi", "--force", "dx"), 2, "NAME=WEIGHT"),
        ("force: twice", ("generate", "med", "hi", "--force", "dx=1", "--force", "dx=0"), 2, "twice"),
        (
            "force: export-lora unknown expert",
            ("export-lora", "med", catalog["root"] / "out", "--force", "gastro2=1"),
            2,
            "not an expert of med@1",
        ),
    ]
    _run_cases("training data and --force", cases, snapshot)


# -- a blob altered on disk, an unknown schema, a network filesystem ------------------------------------------------


def test_blob_altered_on_disk(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    with Registry.open() as registry:
        digest = next(f.sha256 for f in registry.get_expert("gastro").files if f.path == WEIGHTS_FILE)
    rewrite_blob(digest, lambda data: data[:-1] + b"\x00")
    cases: list[Case] = [
        ("verify", ("verify",), 1, "gastro@1 adapter_model.safetensors"),
        ("verify REF", ("verify", "gastro"), 1, f"sha256:{digest} is altered"),
        ("route", ("route", "med", "hi"), 1, f"sha256:{digest} is altered"),
        ("export", ("export", "gastro", "--out", catalog["root"] / "g.tar"), 1, f"sha256:{digest} is altered"),
    ]
    _run_cases("blob altered on disk", cases, snapshot)


def test_unknown_schema_version(catalog: dict[str, Any], snapshot: Callable[[], Any]) -> None:
    from atmoe.registry.config import resolve

    engine = create_engine(resolve().db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    gastro = catalog["adapters"] / "gastro"
    cases: list[Case] = [
        (f"{args[0]}", args, 1, "'0099' is unknown to this atmoe-reg")
        for args in (
            ("list",),
            ("init",),
            ("db", "upgrade"),
            ("verify",),
            ("add-expert", gastro, "--name", "g", "--group", "domain"),
            ("compose", "--name", "x", "--groups", "functional"),
            ("import", catalog["archive"]),
        )
    ]
    _run_cases("unknown schema version", cases, snapshot)


def test_database_on_a_network_filesystem_warns_and_points_to_postgresql(
    catalog: dict[str, Any], snapshot: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite by nature, so the case names its own SQLite file (also under ATMOE_TEST_PG=1)."""
    from atmoe.registry import netfs

    database = catalog["root"] / "on-nfs" / "registry.db"
    url = f"sqlite:///{database}"
    store = str(catalog["root"] / "on-nfs" / "store")  # a catalog of its own: its own store
    monkeypatch.setattr(netfs, "network_filesystem", lambda _path: "nfs4")
    ok("--db", url, "--store", store, "init")
    cases: list[Case] = [
        ("list", ("--db", url, "--store", store, "list", "--json"), 0, "network filesystem (nfs4)"),
        (
            "groups",
            ("--db", url, "--store", store, "groups", "--json"),
            0,
            "use PostgreSQL (--db postgresql+psycopg://",
        ),
    ]
    for label, args, code, fragment in cases:  # the warning comes once per process and path
        monkeypatch.setattr(netfs, "_warned", set())
        _run_cases(
            "network filesystem",
            [(label, args, code, fragment)],
            lambda: snapshot(db_url=url, store=Path(store)),
            prefix="Warning: ",
        )
    with create_engine(url).connect() as connection:  # no WAL where shared memory is not shared
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal"


def test_report_counts() -> None:
    """Printed with -s: how many bad inputs were tried per category (runs last in this module); every
    category the cases above name was tried at least once, so none silently ran empty."""
    print("bad inputs tried:", json.dumps(TRIED))
    assert TRIED and all(count > 0 for count in TRIED.values())
