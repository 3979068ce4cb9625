"""A saved tiny Llama base model (with a tokenizer) and PEFT experts of it, for tests that build a
composition from the catalog (train-router, route) without test_flow's data."""

from __future__ import annotations

from pathlib import Path

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(28))]


def save_base(root: Path) -> Path:
    """``root/base``: a tiny LlamaForCausalLM and its word-level tokenizer, loadable by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from atmoe.testing import make_tiny_llama

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    base_dir = root / "base"
    make_tiny_llama(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab=len(WORDS)).save_pretrained(
        base_dir
    )
    tokenizer.save_pretrained(base_dir)
    return base_dir


def save_experts(base_dir: Path, root: Path, names: list[str]) -> dict[str, Path]:
    """One PEFT LoRA directory per name, of the saved base (so the catalog records its path)."""
    from transformers import AutoModelForCausalLM

    from atmoe.testing import make_peft_adapter

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return {name: make_peft_adapter(base, root / name, r=2, seed=40 + i) for i, name in enumerate(names)}
