"""A catalog with compositions to serve, and a server on 127.0.0.1 (shared by the serve tests).

The catalog is made through the command line, as a user would: a saved tiny Llama whose tokenizer
has a chat template, five PEFT experts in three groups and a general one, the composition ``medqa``
with a router trained on data with known intents (alias ``prod``), a second composition ``narrow``,
and ``remote``, whose experts record a hub id as their base model (loading it would need a download).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from atmoe.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from flow_workspace import DOMAIN, FILLER, FUNCTIONAL, STYLE, make_workspace, word_tokenizer  # noqa: E402,F401  (FILLER: the serve tests read it here)

CHAT_WORDS = ["user", "assistant", "system", "says"]
# each message as "ROLE says CONTENT", then "assistant says" for the answer
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant says{% endif %}"
)
API_KEY = "test-key-7"
MAX_POSITIONS = 512


def tokenizer():
    return word_tokenizer(CHAT_WORDS, chat_template=CHAT_TEMPLATE)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output, result.stderr)
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Catalog:
    home: Path
    db: str
    store: Path
    base: Path

    @property
    def options(self) -> tuple[str, ...]:
        return ("--home", str(self.home), "--db", self.db, "--store", str(self.store))

    def registry(self):
        from atmoe.registry import Registry

        return Registry.open(self.home, self.db, self.store)


def make_catalog(root: Path) -> Catalog:
    workspace = make_workspace(root, tokenizer(), splits=(("train", 16),), max_positions=MAX_POSITIONS)
    base_dir, paths, data = workspace["base"], workspace["paths"], workspace["train"]
    catalog = Catalog(
        home=root / "home",
        db=f"sqlite:///{root / 'home' / 'registry.db'}",
        store=root / "home" / "store",
        base=base_dir,
    )
    opts = catalog.options
    for group, group_names in (("functional", FUNCTIONAL), ("domain", DOMAIN), ("style", STYLE)):
        for name in group_names:
            cli(*opts, "add-expert", str(paths[name]), "--name", name, "--group", group)
    cli(*opts, "add-expert", str(paths["gen"]), "--name", "gen", "--group", "general")
    cli(*opts, "compose", "--name", "medqa", "--groups", "functional,domain,style")
    cli(*opts, "train-router", "medqa", "--data", str(data), "--epochs", "2", "--lr", "0.05", "--batch-size", "8",
        "--alias", "prod")  # fmt: skip
    cli(*opts, "compose", "--name", "narrow", "--groups", "functional,domain,style", "--expert", "fa")
    cli(*opts, "train-router", "narrow", "--kind", "uniform")
    for name, group in (("ra", "functional"), ("rb", "domain")):
        cli(
            *opts,
            "add-expert",
            str(paths["fa"]),
            "--name",
            name,
            "--group",
            group,
            "--base-model",
            "atmoe-test-org/no-such-model",
        )
    cli(*opts, "compose", "--name", "remote", "--groups", "functional,domain", "--expert", "ra", "--expert", "rb")
    return catalog


class Server:
    """uvicorn serving ``create_app`` in a thread on a free 127.0.0.1 port."""

    def __init__(self, catalog: Catalog, refs: list[str], **settings: Any) -> None:
        import uvicorn

        from atmoe.serve.app import create_app
        from atmoe.serve.config import ServeConfig
        from atmoe.serve.pool import ModelPool

        self.registry = catalog.registry()
        self.config = ServeConfig(port=free_port(), **settings)
        self.pool = ModelPool(self.registry, self.config)
        self.pool.preload(refs)
        self.app = create_app(self.pool, self.config)
        self.url = f"http://127.0.0.1:{self.config.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.config.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:  # readiness, not a time limit
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.registry.close()

    def worker(self, key: str):
        return next(s.worker for s in self.pool.served() if s.key == key)


def serving(catalog: Catalog, refs: list[str], **settings: Any) -> Iterator[Server]:
    with Server(catalog, refs, **settings) as server:
        yield server
