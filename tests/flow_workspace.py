"""The flow suites' workspace: a saved tiny Llama with a word-level tokenizer made here, five PEFT experts in
three groups and a general one, and data whose right experts are known.

Responses are what the composition says under each example's intended experts (forced at 1/3 each),
so routing to them lowers the loss. Used by ``test_flow`` (and the suites that import its fixture)
and by ``serve_fixtures``, whose tokenizer adds a chat template.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

FUNCTIONAL, DOMAIN, STYLE = ("fa", "fb"), ("da", "db"), ("sa",)
FILLER = [f"x{i}" for i in range(24)]


def word_tokenizer(extra_words: Sequence[str] = (), chat_template: str | None = None):
    """A word-level tokenizer over the experts' names, the filler words and ``extra_words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *FUNCTIONAL, *DOMAIN, *STYLE, *FILLER, *extra_words]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    made = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        made.chat_template = chat_template
    return made


def make_workspace(
    root: Path, tokenizer, *, splits: Sequence[tuple[str, int]] = (("train", 96), ("eval", 32)), **base_options
) -> dict:
    """``{"base": dir, "paths": {expert: adapter dir}, SPLIT: jsonl path ...}`` under ``root``;
    ``base_options`` go to ``make_tiny_llama`` (``max_positions=...``)."""
    from transformers import AutoModelForCausalLM

    from atmoe import build_atmoe
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    base_dir = root / "base"
    make_tiny_llama(vocab=len(tokenizer), seed=5, **base_options).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()  # adapters record base_dir
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
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with model.forced_routing({name: 1 / 3 for name in intents}), torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        response = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        return {"prompt": prompt, "response": response or "x0", "intents": intents}

    data = {}
    for split, count in splits:
        data[split] = root / f"{split}.jsonl"
        data[split].write_text("\n".join(json.dumps(example()) for _ in range(count)) + "\n")
    return {"base": base_dir, "paths": paths, **data}
