"""Tokenising prompt/response pairs for the demo's own training and evaluation loops.

Not ``atmoe.data.collate``: these loops train PEFT experts and score base models, PEFT models and
compositions alike on plain prompt/response pairs (no chat template, no truncation), and they draw
the same examples thousands of times, so the tokenisation is memoised per tokenizer (two tokenizer
calls per example were about a seventh of an expert's training step). Router training and its
evaluation use the library's own ``atmoe.data`` and ``atmoe.training``.
"""

from __future__ import annotations

import weakref

import torch

# tokenizer -> {(prompt, response): ids}: training loops draw the same examples again and again, and two
# tokenizer calls per example were about a seventh of an expert's training step
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids with <bos>, response ids + <eos>), memoised per tokenizer."""
    cache = _ENCODED.setdefault(tokenizer, {})
    key = (prompt, response)
    if key not in cache:
        prompt_ids = tokenizer(prompt).input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        cache[key] = (prompt_ids, response_ids)
    prompt_ids, response_ids = cache[key]
    return list(prompt_ids), list(response_ids)


def collate(tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels only on response tokens (and <eos>).

    Returns input_ids/attention_mask/labels [B, T] and prompt_mask [B, T] (1 on prompt tokens).
    """
    pairs = [encode(tokenizer, ex["prompt"], ex["response"]) for ex in examples]
    width = max(len(p) + len(r) for p, r in pairs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
        mask[i, :n] = 1
        prompt_mask[i, : len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_mask": prompt_mask}


def collate_prompts(tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded prompts for greedy generation."""
    rows = [tokenizer(ex["prompt"]).input_ids for ex in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
