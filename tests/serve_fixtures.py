"""A catalog with compositions to serve, and a server on 127.0.0.1 (shared by the serve tests).

The catalog is made through the command line, as a user would: a saved tiny Llama whose tokenizer
has a chat template, five PEFT experts in three groups and a general one, the composition ``medqa``
with a router trained on data with known intents (alias ``prod``), a second composition ``narrow``,
and ``remote``, whose experts record a hub id as their base model (loading it would need a download).
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner

from atmoe.cli import main

FUNCTIONAL, DOMAIN, STYLE = ("fa", "fb"), ("da", "db"), ("sa",)
FILLER = [f"x{i}" for i in range(24)]
CHAT_WORDS = ["user", "assistant", "system", "says"]
# each message as "ROLE says CONTENT", then "assistant says" for the answer
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant says{% endif %}"
)
API_KEY = "test-key-7"
MAX_POSITIONS = 512


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *FUNCTIONAL, *DOMAIN, *STYLE, *FILLER, *CHAT_WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    made = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    made.chat_template = CHAT_TEMPLATE
    return made


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
    from transformers import AutoModelForCausalLM

    from atmoe import build_atmoe
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    base_dir = root / "base"
    tok = tokenizer()
    make_tiny_llama(vocab=len(tok), seed=5, max_positions=MAX_POSITIONS).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    names = [*FUNCTIONAL, *DOMAIN, *STYLE, "gen"]
    paths = {name: make_peft_adapter(base, root / name, r=4, seed=20 + i) for i, name in enumerate(names)}
    model = build_atmoe(
        base,
        {
            "functional": {n: paths[n] for n in FUNCTIONAL},
            "domain": {n: paths[n] for n in DOMAIN},
            "style": {n: paths[n] for n in STYLE},
        },
    )
    rng = random.Random(0)

    def example() -> dict:
        intents = [rng.choice(FUNCTIONAL), rng.choice(DOMAIN), STYLE[0]]
        prompt = " ".join([*intents, *rng.sample(FILLER, 2)])
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with model.forced_routing({name: 1 / 3 for name in intents}), torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        response = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        return {"prompt": prompt, "response": response or "x0", "intents": intents}

    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(example()) for _ in range(16)) + "\n")
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
