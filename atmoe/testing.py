"""Tiny deterministic models and LoRA experts for tests, demos and benchmarks (no downloads).

The models are built from configs with seeded random weights (hidden 32, 2 blocks by default) and put
in eval mode. Adapters are either made by PEFT itself (``make_peft_adapter``: get_peft_model, random
non-zero lora_A and lora_B, save_pretrained) or directly in memory (``make_random_adapter``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atmoe.adapters import LoraAdapter

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
BERT_TARGETS = ("query", "key", "value")


def _seeded(seed: int, build: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()


def make_tiny_llama(
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 48,
    vocab: int = 64,
    max_positions: int = 128,
) -> nn.Module:
    """A ``LlamaForCausalLM`` with random weights (init std 0.2, so greedy decoding is decisive)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def make_tiny_gpt2(
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 64,
    max_positions: int = 128,
) -> nn.Module:
    """A ``GPT2LMHeadModel`` (Conv1D layers, fan_in_fan_out) with random weights, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def make_tiny_bert(
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 48,
    vocab: int = 64,
    max_positions: int = 128,
) -> nn.Module:
    """A ``BertModel`` (an encoder: no cache, no generate) with random weights, dropout off."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return _seeded(seed, lambda: BertModel(config))


def default_targets(base: nn.Module) -> tuple[str, ...]:
    """The target module names used when none are given: every linear inside the blocks."""
    model_type = getattr(getattr(base, "config", None), "model_type", "")
    return {"gpt2": GPT2_TARGETS, "bert": BERT_TARGETS}.get(model_type, LLAMA_TARGETS)


def _randomise_lora(model: nn.Module, seed: int) -> None:
    """Random non-zero LoRA tensors, so that every adapter acts: lora_A ~ N(0, 1/in), lora_B ~
    N(0, 0.09/r), lora_embedding_A ~ N(0, 1), lora_embedding_B ~ N(0, 0.09/r), lora_B biases ~
    N(0, 0.01), and DoRA magnitudes moved by about 20% from their initial ||W0 + s B A||."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ".lora_magnitude_vector." in name:
                param.mul_(1 + 0.2 * noise)
                continue
            if ".lora_embedding_A." in name:
                std = 1.0
            elif ".lora_embedding_B." in name or (".lora_B." in name and param.dim() == 2):
                std = 0.3 / math.sqrt(param.shape[1])
            elif ".lora_A." in name:
                std = 1.0 / math.sqrt(param.shape[1])
            elif ".lora_B." in name:  # lora_bias=True: lora_B's bias [out]
                std = 0.1
            else:
                continue
            param.copy_(noise * std)


def make_peft_adapter(
    base: nn.Module,
    out_dir: str | Path,
    *,
    r: int = 4,
    lora_alpha: int | None = None,
    target_modules: Sequence[str] | str | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    seed: int = 0,
    **lora_options: Any,
) -> Path:
    """Make a LoRA adapter of ``base`` with PEFT itself and save it to ``out_dir`` (returned).

    ``base`` is not modified (PEFT works on a deep copy). lora_alpha defaults to 2 r; target modules
    to every linear inside the blocks (``default_targets``). Weights are random and non-zero.
    ``lora_options`` go to ``LoraConfig`` as they are (``use_dora``, ``lora_bias``,
    ``layers_to_transform``, ...).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules or default_targets(base))
        if not isinstance(target_modules, str)
        else target_modules,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0,
        fan_in_fan_out=getattr(getattr(base, "config", None), "model_type", "") == "gpt2",
        **lora_options,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _randomise_lora(peft_model, seed)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def make_random_adapter(
    base: nn.Module,
    *,
    r: int = 8,
    lora_alpha: int | None = None,
    target_modules: Sequence[str] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """An in-memory ``LoraAdapter`` of ``base`` (no PEFT, no files): random A [r, in], B [out, r].

    Targets the linears inside the blocks whose last name is in ``target_modules``.
    """
    from atmoe.layer import linear_shape

    targets = set(target_modules or default_targets(base))
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, module in base.named_modules():
        if key.rpartition(".")[2] not in targets:
            continue
        try:
            in_features, out_features = linear_shape(module)
        except TypeError:
            continue
        lora_a = torch.randn(r, in_features, generator=generator) / math.sqrt(in_features)
        lora_b = torch.randn(out_features, r, generator=generator) * (0.3 / math.sqrt(r))
        tensors[f"base_model.model.{key}.lora_A.weight"] = lora_a.to(dtype)
        tensors[f"base_model.model.{key}.lora_B.weight"] = lora_b.to(dtype)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r if lora_alpha is None else lora_alpha,
        "target_modules": sorted(targets),
        "use_rslora": use_rslora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "fan_in_fan_out": getattr(getattr(base, "config", None), "model_type", "") == "gpt2",
        "base_model_name_or_path": None,
        "task_type": None,
    }
    return LoraAdapter(config=config, tensors=tensors, name=name)
