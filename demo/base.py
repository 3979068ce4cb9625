"""The demo's tiny Llama-style base model and its word-level tokenizer, built locally.

The tokenizer is trained with `tokenizers` (WordLevel over the suite's words, whitespace split,
``<bos>`` added in front of every text like a Llama tokenizer). The base model is a small
``LlamaForCausalLM`` pre-trained briefly on generic text (see ``tasks.generic_text``), then saved
with ``save_pretrained`` so that the adapters' ``base_model_name_or_path`` points at a directory the
registry can load.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atmoe.demo import tasks
from atmoe.demo.progress import progress_bar

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}


@dataclass(frozen=True)
class BaseSpec:
    """Shape and pre-training budget of the demo's base model."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    pretrain_steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3


def build_tokenizer(corpus: list[str]):
    """A word-level tokenizer trained on ``corpus`` by `tokenizers`, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
    )


def build_base(tokenizer, spec: BaseSpec, seed: int = 0):
    """A fresh, untrained LlamaForCausalLM sized by ``spec``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain(
    model, tokenizer, lines: list[str], spec: BaseSpec, *, seed: int = 0, label: str = "pre-train base"
) -> dict:
    """Plain next-token training on ``lines`` (every token is a target). Returns metrics."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.pretrain_steps, pct_start=0.1)
    model.train()
    start, losses = time.perf_counter(), []
    with progress_bar(label, spec.pretrain_steps) as advance:
        for _ in range(spec.pretrain_steps):
            batch = [line + " " + tokenizer.eos_token for line in rng.sample(lines, spec.batch_size)]
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(loss=losses[-1])
    model.eval()
    return {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - start}


def make_base(out_dir: Path, suite: tasks.SuiteSpec, spec: BaseSpec, *, seed: int = 0) -> dict:
    """Train the tokenizer, build and pre-train the base, save both to ``out_dir``."""
    rng = random.Random(seed + 1)
    corpus = tasks.generic_text(rng, 4000, suite)
    # Every suite word appears once at least, so the tokenizer knows the task words too.
    tokenizer = build_tokenizer(corpus + [" ".join(tasks.vocabulary_words())])
    model = build_base(tokenizer, spec, seed=seed)
    metrics = pretrain(model, tokenizer, corpus, spec, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    return metrics
