"""Two machines, simulated: two homes (each with its own local cache) share one database and one bucket.

Machine A adds the experts, composes and records a router; machine B, whose cache is empty, lists,
builds and routes the composition and gets A's answer byte for byte, every blob fetched from the
bucket and verified. Then both add at once, as separate processes, and nothing is lost. The
database is PostgreSQL under ATMOE_TEST_PG=1 (CI), else one SQLite file both homes point at.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import PG_ENABLED  # noqa: E402
from synthetic_lora import write_adapter  # noqa: E402

ATMOE_REG = Path(sys.executable).with_name("atmoe-reg")


@pytest.fixture
def machines(s3_bucket: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, dict[str, str]]:
    if PG_ENABLED:
        database = request.getfixturevalue("pg_database_url")  # emptied for this test by atmoe_home
    else:
        database = f"sqlite:///{tmp_path / 'shared.db'}"
    shared = {**os.environ, "ATMOE_DB_URL": database, "ATMOE_STORE": f"s3://{s3_bucket}/team"}
    shared.pop("ATMOE_CACHE", None)
    return {name: {**shared, "ATMOE_HOME": str(tmp_path / f"home-{name}")} for name in ("a", "b")}


def _run(env: dict[str, str], *args: Any) -> str:
    result = subprocess.run([str(ATMOE_REG), *map(str, args)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def _base(root: Path) -> Path:
    """A tiny Llama with a word-level tokenizer, saved as a model folder both machines can load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from atmoe.testing import make_tiny_llama

    words = ["<pad>", "<s>", "</s>", "<unk>", "fever", "cough", "stomach", "rash", "please", "explain"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    base = root / "base"
    make_tiny_llama(vocab=len(words), seed=7).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def _cached(env: dict[str, str]) -> set[str]:
    cache = Path(env["ATMOE_HOME"]) / "cache" / "sha256"
    return {p.parent.name + p.name for p in cache.glob("??/*")} if cache.exists() else set()


def test_one_machine_composes_the_other_builds_and_routes_it_byte_for_byte(
    machines: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from atmoe.testing import make_peft_adapter

    a, b = machines["a"], machines["b"]
    base_dir = _base(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    members = [("dx", "functional"), ("rx", "functional"), ("gi", "domain"), ("derm", "domain")]
    for seed, (name, group) in enumerate(members):
        adapter = make_peft_adapter(base, tmp_path / name, r=4, seed=30 + seed)
        _run(a, "add-expert", adapter, "--name", name, "--group", group)
    _run(a, "compose", "--name", "clinic", "--groups", "functional,domain")
    _run(a, "train-router", "clinic", "--kind", "uniform", "--alias", "prod")
    assert _cached(b) == set()

    listed_a, listed_b = (json.loads(_run(m, "list", "--json")) for m in (a, b))
    assert listed_a == listed_b and [f"{e['name']}@{e['version']}" for e in listed_b] == [
        "derm@1",
        "dx@1",
        "gi@1",
        "rx@1",
    ]
    prompt = "fever cough please explain"
    route = ("route", "clinic:prod", prompt, "--json")
    routed_a = _run(a, *route)
    routed_b = _run(b, *route)  # B builds from blobs it fetches from the bucket
    assert routed_b == routed_a
    forced = ("route", "clinic:prod", prompt, "--force", "rx=1", "--force", "gi=1", "--json")
    assert _run(b, *forced) == _run(a, *forced)

    from atmoe.registry import Registry

    with Registry.open(home=b["ATMOE_HOME"], db_url=b["ATMOE_DB_URL"], store=b["ATMOE_STORE"]) as registry:
        wanted = {f.sha256 for name, _ in members for f in registry.get_expert(name).files}
        (router,) = registry.routers("clinic")
        wanted.add(router.blob_digest)
        fetched = _cached(b)
        assert wanted <= fetched  # every blob B used came from the bucket into B's own cache
        for digest in fetched:  # and holds exactly the bytes A stored
            assert hashlib.sha256(registry.store.cache.path_for(digest).read_bytes()).hexdigest() == digest
    for name, _ in members:  # the experts' bytes on B are the adapter files A added
        with Registry.open(home=b["ATMOE_HOME"], db_url=b["ATMOE_DB_URL"], store=b["ATMOE_STORE"]) as registry:
            for file in registry.get_expert(name).files:
                assert registry.store.open_verified(file.sha256) == (tmp_path / name / file.path).read_bytes()
    assert "OK:" in subprocess.run([str(ATMOE_REG), "verify"], env=b, capture_output=True, text=True).stderr


def test_both_machines_add_at_once_and_nothing_is_lost(machines: dict[str, dict[str, str]], tmp_path: Path) -> None:
    a, b = machines["a"], machines["b"]
    _run(a, "init")
    script = (
        "import subprocess, sys\n"
        "for i in range(int(sys.argv[2])):\n"
        "    subprocess.run([sys.argv[1], 'add-expert', f'{sys.argv[3]}/{i}', '--name', f'{sys.argv[4]}{i}',\n"
        "                    '--group', 'domain'], check=True, capture_output=True)\n"
        "    subprocess.run([sys.argv[1], 'add-expert', f'{sys.argv[3]}/shared', '--name', 'shared',\n"
        "                    '--group', 'domain'], check=True, capture_output=True)\n"
    )
    count = 3
    workers = []
    for name, env in (("a", a), ("b", b)):
        root = tmp_path / f"adapters-{name}"
        for i in range(count):
            write_adapter(root / str(i), seed=100 * (name == "b") + i)
        write_adapter(root / "shared", seed=999)  # identical content from both machines
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(ATMOE_REG), str(count), str(root), name], env=env,
                stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr
    for env in (a, b):
        refs = sorted(f"{e['name']}@{e['version']}" for e in json.loads(_run(env, "list", "--json")))
        assert refs == sorted([f"{m}{i}@1" for m in "ab" for i in range(count)] + ["shared@1"])
        assert "OK:" in subprocess.run([str(ATMOE_REG), "verify"], env=env, capture_output=True, text=True).stderr
