"""Asking a built model which groups and experts it routes a prompt to, and generating with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext

import torch

from atmoe.data import encode_prompt
from atmoe.report import routing_document


def _prompt_tensors(model, tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)  # [1, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _forcing(model, force: Mapping[str, float] | None):
    return model.forced_routing(force) if force else nullcontext(model)


@torch.no_grad()
def route_prompt(model, tokenizer, prompt: str, *, force: Mapping[str, float] | None = None) -> dict:
    """One forward pass over ``prompt``; the routing per block and averaged over blocks (``route --json``)."""
    with _forcing(model, force):
        model(**_prompt_tensors(model, tokenizer, prompt))
        blocks = model.last_routing()
    document = routing_document(blocks)
    document["forced"] = dict(force) if force else None
    return document


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    force: Mapping[str, float] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, dict]:
    """Greedy answer to ``prompt`` (streamed to ``on_text`` as it is decoded) and the prompt's routing."""
    from transformers import TextStreamer

    streamer = None
    if on_text is not None:

        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = _prompt_tensors(model, tokenizer, prompt)
    with _forcing(model, force):
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
        document = routing_document(model.last_routing())
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    document["forced"] = dict(force) if force else None
    return answer, document
