"""Router training data: JSONL reading with line-numbered errors, and response-only labels.

A line is one JSON object, either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", "content": ...}]}``
(the last message is the response). An optional ``"intents": [expert names]`` names the experts the
instruction needs; it drives the auxiliary routing loss and the routing accuracy metric.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atmoe.errors import DataError
from atmoe.jsontext import JsonTextError, parse_json

IGNORE_INDEX = -100
_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; ``line`` is its 1-based line number in ``source``."""

    response: str
    prompt: str | None = None
    messages: tuple[dict, ...] = ()
    intents: tuple[str, ...] = ()
    source: str = "<memory>"
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``labels`` is -100 on every prompt token (loss on the response only)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    intents: tuple[str, ...] = field(default=())


def data_digest(path: str | Path) -> str:
    """Hex sha256 of the file's bytes: what a router records as its training data digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_example(obj: object, *, source: str = "<memory>", line: int = 0) -> Example:
    """Validate one decoded JSON value; raises ``DataError`` naming ``source:line``."""
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    intents = obj.get("intents", [])
    if not isinstance(intents, list) or not all(isinstance(i, str) and i for i in intents):
        raise DataError(f"{where}: 'intents' must be a list of expert names")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two messages")
        for index, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in _ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: message {index} needs a 'role' in {sorted(_ROLES)} and a string 'content'")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise DataError(f"{where}: the last message must be a non-empty assistant message (the response)")
        return Example(
            response=messages[-1]["content"],
            messages=tuple(dict(m) for m in messages[:-1]),
            intents=tuple(intents),
            source=source,
            line=line,
        )
    prompt, response = obj.get("prompt"), obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: expected string fields 'prompt' and 'response' (or 'messages')")
    if not response:
        raise DataError(f"{where}: 'response' is empty")
    return Example(response=response, prompt=prompt, intents=tuple(intents), source=source, line=line)


def read_examples(path: str | Path) -> list[Example]:
    """Read a JSONL file; blank lines are skipped; the first malformed line raises ``DataError``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = parse_json(raw)
        except JsonTextError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc})") from None
        examples.append(parse_example(obj, source=str(path), line=number))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def check_intents(examples: Iterable[Example], expert_names: Sequence[str]) -> None:
    """Refuse intents that name no expert of the composition (line number given)."""
    known = set(expert_names)
    for example in examples:
        unknown = [name for name in example.intents if name not in known]
        if unknown:
            raise DataError(f"{example.where}: unknown expert(s) in 'intents': {', '.join(unknown)}")


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """Token ids of the prompt side, through the chat template when there are messages and one exists."""
    if example.messages:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(list(example.messages), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in example.messages) + "\nassistant: "
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(example.prompt)["input_ids"])


def encode_prompt(tokenizer, prompt: str, *, chat: bool | None = None) -> list[int]:
    """Ids of a user's prompt for routing or generation (chat template when the tokenizer has one)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        example = Example(response="-", messages=({"role": "user", "content": prompt},))
    else:
        example = Example(response="-", prompt=prompt)
    return prompt_ids(tokenizer, example)


def encode_example(tokenizer, example: Example, *, max_length: int) -> Encoded:
    """Prompt + response (+ EOS) token ids, truncated from the left of the prompt to ``max_length``."""
    prompt = prompt_ids(tokenizer, example)
    response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    response = response[:max_length]
    keep = max_length - len(response)
    prompt = prompt[-keep:] if keep > 0 else []
    return Encoded(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        prompt_length=len(prompt),
        intents=example.intents,
    )


def collate(batch: Sequence[Encoded], *, pad_token_id: int, expert_index: dict[str, int] | None = None):
    """Right-pad a batch into tensors; ``intent_mask [B, E]`` marks each example's intended experts."""
    import torch

    length = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # [B, T]
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if expert_index is not None:
        intent_mask = torch.zeros((len(batch), len(expert_index)))  # [B, E]
        for row, item in enumerate(batch):
            for name in item.intents:
                intent_mask[row, expert_index[name]] = 1.0
        out["intent_mask"] = intent_mask
    return out
