"""hf://ORG/REPO[@REVISION][/SUBFOLDER]: experts and base models from a Hub cache written here, offline.

Every test runs with HF_HUB_OFFLINE=1, HF_HUB_CACHE in its temp dir and no socket able to connect
(``no_network`` fails the test on any attempt). The online path (``--allow-downloads``) runs in a
subprocess against ``FakeHub`` on 127.0.0.1, the only address that subprocess may connect to.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atmoe.errors import InvalidAdapter, ModelLoadError, SourceUnavailable, UsageError
from atmoe.hub import ADAPTER_FILES, HubRef, parse_hub_ref
from atmoe.registry import Registry
from atmoe.registry.experts import content_digest

sys.path.insert(0, str(Path(__file__).parent))
from hub_cache import (  # noqa: E402
    FakeHub,
    FakeRepo,
    cache_commit,
    commit_of,
    folder_files,
    mark_missing,
    repo_dir,
    serve,
)
from synthetic_lora import assert_one_line_error, invoke, ok  # noqa: E402

CONFIG, WEIGHTS = ADAPTER_FILES
REPO = "acme/med-experts"
MAIN, OLD = commit_of("main"), commit_of("v1")


def adapter_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """The two files an hf:// expert takes from a PEFT folder."""
    return {(f"{prefix}/" if prefix else "") + name: (folder / name).read_bytes() for name in ADAPTER_FILES}


def two_file_digest(folder: Path) -> str:
    import hashlib

    return content_digest((name, hashlib.sha256((folder / name).read_bytes()).hexdigest()) for name in ADAPTER_FILES)


# -- the environment: offline, a cache of our own, no sockets ----------------------------------------


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("ATMOE_ALLOW_DOWNLOADS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "")  # recorded, so that what the CLI sets in-process is undone after the test
        monkeypatch.delenv(name)
    return cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every connection or name lookup fails, and is recorded; the test fails if there was one."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def refuse(address: Any) -> OSError:
        attempts.append(address)
        return OSError(errno.ENETUNREACH, f"tests/test_hub.py: no network (tried {address!r})")

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect(self, address)
        raise refuse(address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise refuse(host)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address).errno)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"a network connection was attempted: {attempts}"


@pytest.fixture
def med_repo(hub_cache: Path, adapters: dict[str, Path]) -> Path:
    """acme/med-experts: main (and dev) at MAIN with two adapters, a README-only folder, extra files
    beside an adapter (a README and a pickle, never fetched); v1 (and feature/x) at OLD."""
    main_files = {
        **adapter_files(adapters["gastro"], "gastro"),
        "gastro/README.md": b"# gastro\n",
        "gastro/training_args.bin": b"\x80\x04pickle, never read",
        **adapter_files(adapters["diagnosis"], "diagnosis"),
        "notes/README.md": b"# notes\n",
        "half/adapter_config.json": (adapters["gastro"] / "adapter_config.json").read_bytes(),
        "README.md": b"# med experts\n",
    }
    cache_commit(hub_cache, REPO, MAIN, main_files, refs=("main", "dev"))
    cache_commit(hub_cache, REPO, OLD, adapter_files(adapters["rigorous"], "gastro"), refs=("v1", "feature/x"))
    return repo_dir(hub_cache, REPO)


def expert_json(name: str) -> dict[str, Any]:
    return json.loads(ok("show", name, "--json").stdout)


# -- the grammar ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://acme/med", HubRef("acme/med")),
        ("hf://acme/med@main", HubRef("acme/med", "main")),
        ("hf://acme/med@v1.2/gastro", HubRef("acme/med", "v1.2", "gastro")),
        (f"hf://acme/med@{MAIN}/a/b", HubRef("acme/med", MAIN, "a/b")),
        ("hf://acme/med@feature%2Fx/sub", HubRef("acme/med", "feature/x", "sub")),
        ("hf://acme/med@refs/pr/3/sub", HubRef("acme/med", "refs/pr/3", "sub")),
        ("hf://Acme_1/m.e-d/with space", HubRef("Acme_1/m.e-d", None, "with space")),
    ],
)
def test_sources_parse_and_print_back(text: str, expected: HubRef) -> None:
    assert parse_hub_ref(text) == expected
    assert parse_hub_ref(str(expected)) == expected
    assert expected.pinned(MAIN) == f"hf://{expected.repo_id}@{MAIN}" + (
        f"/{expected.subfolder}" if expected.subfolder else ""
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("hf://", "no repository"),
        ("hf://acme", "no repository"),
        ("hf://acme/", "the repository is empty"),
        ("hf:///med", "the organisation is empty"),
        ("hf://ac--me/med", "not a Hub name"),
        ("hf://acme/-med", "not a Hub name"),
        ("hf://acme/me..d", "not a Hub name"),
        ("hf://acme/med.git", "not a Hub repo id"),
        ("hf://acme/" + "m" * 100, "not a Hub repo id"),
        ("hf://acme/med@", "nothing after '@'"),
        ("hf://acme/med@a..b", "not a branch, tag or commit"),
        ("hf://acme/med@x.lock", "not a branch, tag or commit"),
        ("hf://acme/med/gastro@v1", "right after the repository, as in hf://acme/med@v1/gastro"),
        ("hf://acme/med/../etc", "'.' or '..' part"),
        ("hf://acme/med/gastro/", "empty"),
        ("hf://acme/med//gastro", "empty"),
        ("hf://acme/med/a\\b", "backslash"),
    ],
)
def test_malformed_sources_are_one_usage_line(text: str, fragment: str, snapshot: Callable[[], Any]) -> None:
    with pytest.raises(UsageError, match="malformed hub source") as info:
        parse_hub_ref(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    ok("init")
    before = snapshot()
    assert_one_line_error(invoke("add-expert", text, "--name", "x", "--group", "domain"), 2, fragment)
    assert snapshot() == before


_name = st.from_regex(r"\A[A-Za-z0-9_]([A-Za-z0-9_.-]{0,10}[A-Za-z0-9_])?\Z").filter(
    lambda n: "--" not in n and ".." not in n and not n.endswith(".git")
)


@given(
    org=_name,
    repo=_name,
    revision=st.none()
    | (_name | st.builds(lambda a, b: f"{a}/{b}", _name, _name)).filter(lambda r: not r.endswith(".lock")),
    subfolder=st.none() | st.lists(_name, min_size=1, max_size=3).map("/".join),
)
def test_any_valid_source_prints_back_to_itself(
    org: str, repo: str, revision: str | None, subfolder: str | None
) -> None:
    ref = HubRef(f"{org}/{repo}", revision, subfolder)
    assert parse_hub_ref(str(ref)) == ref


def test_a_path_that_only_looks_like_a_source_is_a_path(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    shutil.copytree(adapters["gastro"], tmp_path / "hf:" / "x")
    monkeypatch.chdir(tmp_path)
    ok("add-expert", "./hf:/x", "--name", "local", "--group", "domain")
    assert expert_json("local")["source"] == str((tmp_path / "hf:" / "x").resolve())
    with Registry.open() as registry, pytest.raises(InvalidAdapter, match="no such directory"):
        registry.add_expert(Path("hf://acme/x"), name="p", group="domain")  # a Path is never a source


# -- add-expert from the cache --------------------------------------------------------------------------


def test_no_revision_means_main_and_the_commit_is_recorded(med_repo: Path, adapters: dict[str, Path]) -> None:
    result = ok("add-expert", f"hf://{REPO}/gastro", "--name", "gastro", "--group", "domain")
    pinned = f"hf://{REPO}@{MAIN}/gastro"
    assert f"Added gastro@1 to group domain from {pinned}" in result.stderr
    record = expert_json("gastro")
    assert record["source"] == pinned
    assert [f["path"] for f in record["files"]] == sorted(ADAPTER_FILES)  # no README, no pickle
    assert record["digest"] == two_file_digest(adapters["gastro"])
    shown = ok("show", "gastro").stdout
    assert pinned in shown
    again = json.loads(
        ok("add-expert", f"hf://{REPO}@main/gastro", "--name", "gastro", "--group", "domain", "--json").stdout
    )
    assert again == {
        "ref": "gastro@1",
        "name": "gastro",
        "version": 1,
        "created": False,
        "digest": record["digest"],
        "source": pinned,
    }


@pytest.mark.parametrize(
    ("revision", "commit", "content"),
    [
        ("main", MAIN, "gastro"),
        ("dev", MAIN, "gastro"),
        ("v1", OLD, "rigorous"),
        ("feature%2Fx", OLD, "rigorous"),
        (OLD, OLD, "rigorous"),
        (MAIN, MAIN, "gastro"),
    ],
)
def test_a_branch_tag_or_commit_resolves_through_the_cache(
    med_repo: Path, adapters: dict[str, Path], revision: str, commit: str, content: str
) -> None:
    added = json.loads(
        ok("add-expert", f"hf://{REPO}@{revision}/gastro", "--name", "g", "--group", "domain", "--json").stdout
    )
    assert added["source"] == f"hf://{REPO}@{commit}/gastro"
    record = expert_json("g")
    assert record["source"] == added["source"]
    assert record["digest"] == two_file_digest(adapters[content])


def test_an_adapter_at_the_repository_root_and_through_the_library(
    hub_cache: Path, adapters: dict[str, Path], registry: Registry
) -> None:
    root_commit = commit_of("root")
    cache_commit(hub_cache, "acme/root-adapter", root_commit, folder_files(adapters["diagnosis"]), refs=("main",))
    expert, created = registry.add_expert("hf://acme/root-adapter", name="diagnosis", group="functional")
    assert created and expert.source == f"hf://acme/root-adapter@{root_commit}"
    assert {f.path for f in expert.files or ()} == set(ADAPTER_FILES)
    assert expert.r == 4 and expert.digest == two_file_digest(adapters["diagnosis"])
    assert registry.verify_report("diagnosis").ok


def test_a_subfolder_from_the_library_keeps_its_commit(med_repo: Path, registry: Registry) -> None:
    expert, _ = registry.add_expert(f"hf://{REPO}@v1/gastro", name="old", group="style", description="v1")
    assert expert.source == f"hf://{REPO}@{OLD}/gastro" and expert.ref == "old@1"
    newer, created = registry.add_expert(f"hf://{REPO}/gastro", name="old", group="style")
    assert created and newer.ref == "old@2" and newer.source == f"hf://{REPO}@{MAIN}/gastro"


# -- errors: one line, nothing stored ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "code", "fragment"),
    [
        ("hf://acme/missing/gastro", 1, "acme/missing is not in the local Hub cache"),
        (f"hf://{REPO}@nope/gastro", 1, f"revision 'nope' of {REPO} is not in the local Hub cache"),
        (f"hf://{REPO}@{'0' * 40}/gastro", 1, f"revision '{'0' * 40}' of {REPO} is not in the local Hub cache"),
        (f"hf://{REPO}/notes", 1, f"no adapter_config.json or adapter_model.safetensors in 'notes' at commit {MAIN}"),
        (f"hf://{REPO}/half", 1, f"no adapter_model.safetensors in 'half' at commit {MAIN}"),
        (f"hf://{REPO}", 1, "in the repository's root at commit"),
    ],
)
def test_what_the_cache_lacks_is_named_and_nothing_is_stored(
    med_repo: Path, snapshot: Callable[[], Any], source: str, code: int, fragment: str
) -> None:
    ok("init")
    before = snapshot()
    line = assert_one_line_error(invoke("add-expert", source, "--name", "x", "--group", "domain"), code, fragment)
    assert "downloads are off: pass --allow-downloads" in line
    assert snapshot() == before


def test_offline_wins_over_allow_downloads(med_repo: Path, snapshot: Callable[[], Any]) -> None:
    ok("init")
    before = snapshot()
    result = invoke("--allow-downloads", "add-expert", "hf://acme/missing", "--name", "x", "--group", "domain")
    assert_one_line_error(result, 1, "HF_HUB_OFFLINE is set")
    assert snapshot() == before


def test_a_folder_the_hub_said_has_no_adapter(med_repo: Path, hub_cache: Path) -> None:
    mark_missing(hub_cache, REPO, MAIN, "absent/adapter_config.json")  # what huggingface_hub writes after a 404
    result = invoke("add-expert", f"hf://{REPO}/absent", "--name", "x", "--group", "domain")
    assert_one_line_error(result, 1, f"no PEFT LoRA adapter in 'absent' at commit {MAIN}")


def test_a_damaged_adapter_in_the_cache_is_refused_naming_the_source(
    hub_cache: Path, adapters: dict[str, Path], snapshot: Callable[[], Any]
) -> None:
    files = adapter_files(adapters["gastro"], "broken")
    files["broken/adapter_model.safetensors"] = files["broken/adapter_model.safetensors"][:-10]
    commit = commit_of("broken")
    cache_commit(hub_cache, "acme/broken", commit, files, refs=("main",))
    ok("init")
    before = snapshot()
    result = invoke("add-expert", "hf://acme/broken/broken", "--name", "x", "--group", "domain")
    assert_one_line_error(result, 1, f"hf://acme/broken@{commit}/broken: adapter_model.safetensors: truncated")
    assert snapshot() == before


def test_errors_from_the_library_are_the_toolkits(med_repo: Path, registry: Registry) -> None:
    with pytest.raises(SourceUnavailable, match="is not in the local Hub cache"):
        registry.add_expert("hf://acme/missing", name="x", group="domain")
    with pytest.raises(UsageError, match="malformed hub source"):
        registry.add_expert("hf://acme", name="x", group="domain")
    with pytest.raises(UsageError, match="names revision 'v1' but --base-revision is 'v2'"):
        registry.add_expert(
            f"hf://{REPO}/gastro", name="x", group="domain", base_model="hf://acme/base@v1", base_revision="v2"
        )
    assert registry.list_experts() == []


# -- a base model named hf://ORG/REPO[@REVISION] ------------------------------------------------------------

BASE_REPO = "acme/tiny-llama"
BASE_COMMIT = commit_of("tiny-llama")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved LlamaForCausalLM (the conftest adapters' shape) and a WordLevel tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from atmoe.testing import make_tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab=64).save_pretrained(folder)
    words = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(60))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cached_base(hub_cache: Path, tiny_base: Path) -> Path:
    return cache_commit(hub_cache, BASE_REPO, BASE_COMMIT, folder_files(tiny_base), refs=("main",))


@pytest.mark.parametrize("ref", [f"hf://{BASE_REPO}", f"hf://{BASE_REPO}@main", f"hf://{BASE_REPO}@{BASE_COMMIT}"])
def test_a_base_model_loads_offline_from_the_cache(
    cached_base: Path, tiny_base: Path, tmp_path: Path, ref: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from atmoe.loading import load_base_model
    from atmoe.testing import make_peft_adapter

    model, tokenizer = load_base_model(ref)
    assert model.name_or_path == tokenizer.name_or_path == BASE_REPO  # not the snapshot's path
    trained = make_peft_adapter(model, tmp_path / "trained-on-it")
    assert json.loads((trained / CONFIG).read_text())["base_model_name_or_path"] == BASE_REPO
    reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.tensor([tokenizer("w1 w2 w3")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [(f"hf://{BASE_REPO}@v9", "'hf://acme/tiny-llama@v9'"), ("hf://acme/absent", "'hf://acme/absent'")],
)
def test_a_base_model_not_in_the_cache_is_refused_without_permission(
    cached_base: Path, monkeypatch: pytest.MonkeyPatch, ref: str, fragment: str
) -> None:
    from atmoe.loading import load_base_model

    monkeypatch.delenv("HF_HUB_OFFLINE")  # only the missing permission stands between it and the network
    with pytest.raises(ModelLoadError) as info:
        load_base_model(ref)
    message = str(info.value)
    assert fragment in message and "not in the local Hub cache" in message and "\n" not in message
    assert "downloads are off: pass --allow-downloads (or set ATMOE_ALLOW_DOWNLOADS=1)" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ATMOE_ALLOW_DOWNLOADS", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_base_model(ref)


def test_a_base_model_only_partly_in_the_cache_is_named_so(hub_cache: Path, tiny_base: Path) -> None:
    from atmoe.loading import load_base_model

    files = {k: v for k, v in folder_files(tiny_base).items() if not k.endswith(".safetensors")}
    cache_commit(hub_cache, BASE_REPO, BASE_COMMIT, files, refs=("main",))
    with pytest.raises(ModelLoadError, match="is only partly in the local Hub cache .*downloads are off") as info:
        load_base_model(f"hf://{BASE_REPO}")
    assert "\n" not in str(info.value)


def test_a_base_model_reference_takes_no_subfolder() -> None:
    from atmoe.loading import resolve_model_ref

    with pytest.raises(UsageError, match="a base model is a whole repository"):
        resolve_model_ref(f"hf://{BASE_REPO}/sub")
    resolved = resolve_model_ref(f"hf://{BASE_REPO}@v2")
    assert (resolved.location, resolved.revision, resolved.is_local) == (BASE_REPO, "v2", False)


def test_hub_expert_on_a_hub_base_model_composes_and_routes_offline(med_repo: Path, cached_base: Path) -> None:
    base = ("--base-model", f"hf://{BASE_REPO}@main")
    ok("add-expert", f"hf://{REPO}/gastro", "--name", "gastro", "--group", "domain", *base)
    ok("add-expert", f"hf://{REPO}/diagnosis", "--name", "diagnosis", "--group", "functional", *base)
    ok(
        "add-expert",
        f"hf://{REPO}@v1/gastro",
        "--name",
        "unpinned",
        "--group",
        "style",
        "--base-model",
        f"hf://{BASE_REPO}",
    )
    gastro, unpinned = expert_json("gastro"), expert_json("unpinned")
    assert (gastro["base_model"], gastro["base_revision"]) == (BASE_REPO, "main")  # one name for one model
    assert (unpinned["base_model"], unpinned["base_revision"]) == (BASE_REPO, None)
    listed = json.loads(ok("list", "--base-model", f"hf://{BASE_REPO}", "--json").stdout)
    assert [r["name"] for r in listed] == ["diagnosis", "gastro", "unpinned"]
    ok("compose", "--name", "med", "--groups", "functional,domain")
    routed = json.loads(ok("route", "med", "w1 w2 w3", "--json").stdout)
    assert routed["lineage"]["base_model"] == BASE_REPO
    assert sorted(routed["blocks"][0]["experts"]) == ["diagnosis", "gastro"]


# -- online, against a fake Hub on 127.0.0.1 (a subprocess: huggingface_hub reads its settings at import) ----

_GUARDED_CLI = """
import socket, sys
port = int(sys.argv[1])
real = socket.socket.connect
def connect(self, address):
    if self.family == socket.AF_INET and address == ("127.0.0.1", port):
        return real(self, address)
    raise OSError(101, f"no network in this test (tried {address!r})")
real_lookup = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host in ("127.0.0.1", b"127.0.0.1"):
        return real_lookup(host, *args, **kwargs)
    raise OSError(101, f"no network in this test (looked up {host!r})")
socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
from atmoe.cli import main
main(sys.argv[2:], prog_name="atmoe-reg")
"""


def online(hub: FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith(("HF_", "HUGGING"))
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),  # no token of the user's is sent anywhere
        HF_HUB_CACHE=os.environ["HF_HUB_CACHE"],
        HF_HUB_DISABLE_TELEMETRY="1",
        ATMOE_ALLOW_DOWNLOADS="1",
    )
    env.pop("TRANSFORMERS_OFFLINE", None)
    port = hub.url.rsplit(":", 1)[1]
    return subprocess.run(
        [sys.executable, "-c", _GUARDED_CLI, port, *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture
def fake_hub(adapters: dict[str, Path]) -> Iterator[FakeHub]:
    online_commit = commit_of("online")
    files = {**adapter_files(adapters["gastro"], "gastro"), "notes/README.md": b"# notes\n"}
    hub = FakeHub(
        {
            "acme/online": FakeRepo({online_commit: files}, {"main": online_commit}),
            "acme/gated": FakeRepo({online_commit: files}, {"main": online_commit}, gated=True),
            "acme/private": FakeRepo({online_commit: files}, {"main": online_commit}, private=True),
        }
    )
    with serve(hub):
        yield hub


def test_downloads_fill_the_cache_once_and_record_the_commit(
    fake_hub: FakeHub, tmp_path: Path, hub_cache: Path, adapters: dict[str, Path]
) -> None:
    result = online(
        fake_hub, tmp_path, "add-expert", "hf://acme/online/gastro", "--name", "gastro", "--group", "domain"
    )
    assert result.returncode == 0, result.stderr
    pinned = f"hf://acme/online@{commit_of('online')}/gastro"
    assert pinned in result.stderr
    commit = commit_of("online")
    # the first file resolves main; the second is read at main's commit; each a HEAD, then a GET
    assert sorted(set(fake_hub.requests)) == [
        (method, path)
        for method in ("GET", "HEAD")
        for path in (f"/acme/online/resolve/{commit}/gastro/{WEIGHTS}", f"/acme/online/resolve/main/gastro/{CONFIG}")
    ]
    record = expert_json("gastro")
    assert record["source"] == pinned and record["digest"] == two_file_digest(adapters["gastro"])
    assert (repo_dir(hub_cache, "acme/online") / "refs" / "main").read_text() == commit_of("online")
    asked = len(fake_hub.requests)
    again = online(fake_hub, tmp_path, "add-expert", "hf://acme/online/gastro", "--name", "copy", "--group", "domain")
    assert again.returncode == 0, again.stderr
    assert len(fake_hub.requests) == asked  # the cache first: the Hub is not asked again
    assert expert_json("copy")["source"] == pinned


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("hf://acme/gated/gastro", "acme/gated is gated: accept its conditions on huggingface.co"),
        ("hf://acme/private/gastro", "no repository acme/private on the Hub, or it is private"),
        ("hf://acme/nobody/gastro", "no repository acme/nobody on the Hub"),
        ("hf://acme/online@nope/gastro", "acme/online has no branch, tag or commit 'nope'"),
        ("hf://acme/online/notes", "no PEFT LoRA adapter in 'notes'"),
    ],
)
def test_the_hubs_refusals_are_one_line_and_store_nothing(
    fake_hub: FakeHub, tmp_path: Path, snapshot: Callable[[], Any], source: str, fragment: str
) -> None:
    ok("init")
    before = snapshot()
    result = online(fake_hub, tmp_path, "add-expert", source, "--name", "x", "--group", "domain")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and fake_hub.requests
    assert snapshot() == before


@pytest.mark.slow  # huggingface_hub >= 1.0 retries a failed connection with backoff, about 25 s
def test_no_network_is_one_line(tmp_path: Path, snapshot: Callable[[], Any]) -> None:
    closed = socket.socket()  # a port that nothing listens on
    closed.bind(("127.0.0.1", 0))
    hub = FakeHub({}, url=f"http://127.0.0.1:{closed.getsockname()[1]}")
    ok("init")
    before = snapshot()
    result = online(hub, tmp_path, "add-expert", "hf://acme/online/gastro", "--name", "x", "--group", "domain")
    closed.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0], result.stderr
    assert snapshot() == before
