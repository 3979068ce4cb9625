"""Scores of a built composition on examples: response loss, exact match of greedy answers, routing accuracy.

``score(model, tokenizer, examples)`` is what ``atmoe-reg eval`` stores. Every number is a function of the
model, the examples and the settings alone (greedy decoding, no sampling, eval mode), so the same router and
data give the same metrics (``tests/test_evaluations.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atmoe.data import Example, prompt_ids
from atmoe.training import evaluate


def answers_match(answer: str, response: str) -> bool:
    """Exact match up to whitespace: the same words in the same order."""
    return answer.split() == response.split()


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    max_length: int = 512,
) -> list[str]:
    """Greedy answers (text up to EOS) to the prompts of ``examples``, left-padded in batches; each
    request's routing is chosen on its prompt and held for its decode steps (``AtMoEModel.generate``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, example)[-max_length:] for example in examples[start : start + batch_size]]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, T], left padded
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in out[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def score(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    max_new_tokens: int | None = None,
) -> dict:
    """{"eval_loss", "exact_match", "routing_accuracy" (when intents exist), "tokens", "max_new_tokens"}.

    ``max_new_tokens`` defaults to the longest response's token count plus 2 (an answer that runs on
    past the reference does not match anyway)."""
    if max_new_tokens is None:
        longest = max(len(tokenizer(example.response, add_special_tokens=False)["input_ids"]) for example in examples)
        max_new_tokens = longest + 2
    scores = evaluate(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    answers = greedy_answers(
        model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
    )
    metrics = {
        "eval_loss": scores["loss"],
        "exact_match": sum(answers_match(a, e.response) for a, e in zip(answers, examples)) / len(examples),
        "tokens": scores["tokens"],
        "max_new_tokens": max_new_tokens,
    }
    if "routing_accuracy" in scores:
        metrics["routing_accuracy"] = scores["routing_accuracy"]
    return metrics
