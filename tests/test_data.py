"""Training data parsing: good lines parse; each malformed line is refused with its line number."""

from __future__ import annotations

import json

import pytest

from atmoe.data import IGNORE_INDEX, Example, check_intents, data_digest, read_examples
from atmoe.errors import DataError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_prompt_response_and_messages(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            json.dumps({"prompt": "q1", "response": "a1", "intents": ["diagnosis"]}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}),
        ],
    )
    first, second = read_examples(path)
    assert (first.prompt, first.response, first.intents, first.line) == ("q1", "a1", ("diagnosis",), 1)
    assert second.messages == ({"role": "user", "content": "q2"},) and second.response == "a2"
    assert second.line == 3


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "q"}), "'prompt' and 'response'"),
        (json.dumps({"prompt": "q", "response": ""}), "'response' is empty"),
        (json.dumps({"prompt": 3, "response": "a"}), "'prompt' and 'response'"),
        (json.dumps({"prompt": "q", "response": "a", "intents": "diagnosis"}), "'intents'"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "at least two"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}), "assistant"),
        (json.dumps({"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}), "role"),
    ],
)
def test_malformed_line_names_its_number(tmp_path, line, fragment):
    good = json.dumps({"prompt": "q", "response": "a"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert "bad.jsonl:3:" in message and fragment in message
    assert "\n" not in message


def test_empty_missing_and_binary_files(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no examples"):
        read_examples(empty)
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(binary)


def test_unknown_intent_is_refused_with_line():
    example = Example(response="a", prompt="q", intents=("nobody",), source="t.jsonl", line=7)
    with pytest.raises(DataError, match=r"t\.jsonl:7: unknown expert\(s\) in 'intents': nobody"):
        check_intents([example], ["diagnosis"])


def test_digest_is_sha256_of_bytes(tmp_path):
    import hashlib

    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "response": "a"})])
    assert data_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_masks_prompt_and_appends_eos():
    from atmoe.data import encode_example

    class Tok:
        eos_token_id = 99
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            ids = [len(word) for word in text.split()]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    encoded = encode_example(Tok(), Example(prompt="aa bbb", response="c dd"), max_length=100)
    assert encoded.input_ids == [1, 2, 3, 1, 2, 99]
    assert encoded.labels == [IGNORE_INDEX] * 3 + [1, 2, 99]
    short = encode_example(Tok(), Example(prompt="aa bbb", response="c dd"), max_length=4)
    assert short.input_ids == [3, 1, 2, 99] and short.labels[0] == IGNORE_INDEX
