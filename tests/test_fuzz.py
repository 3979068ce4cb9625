"""Fuzzing add-expert's validation with hypothesis: only the tool's own errors may come out.

Generated adapter_config.json documents (random, missing or wrong-typed keys; rank and alpha patterns)
and safetensors files (random bytes; wrong header lengths, bogus dtypes, bad shapes, overlapping or
out-of-range offsets, huge header lengths, non-JSON headers, data that does not match the shapes)
are validated as an adapter directory. The result is either an accepted adapter or an
``AtmoeError``; never another exception.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import invoke  # noqa: E402

from atmoe.errors import AtmoeError  # noqa: E402
from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE, validate_adapter  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
patterns = st.sampled_from(
    ["q_proj", "v_proj", "layers.0.q_proj", ".*", "(?i)q", "q)(", "\\1", "[", "a|b", "(x)"]
) | st.text(max_size=6)
config_values = {
    "peft_type": st.sampled_from(["LORA", "LORA", "IA3", "lora", ""]) | json_scalars,
    "r": st.sampled_from([1, 2, 4, 8]) | json_scalars,
    "lora_alpha": st.sampled_from([1, 8, 16.5, float("inf"), float("nan")]) | json_scalars,
    "use_rslora": st.booleans() | json_scalars,
    "target_modules": st.lists(st.text(max_size=8), max_size=3) | json_values,
    "rank_pattern": st.dictionaries(patterns, st.integers(-2, 8) | json_scalars, max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(patterns, st.floats() | json_scalars, max_size=3) | json_values,
    "base_model_name_or_path": st.text(max_size=10) | json_scalars,
    "revision": st.text(max_size=10) | json_scalars,
    "use_dora": st.booleans() | json_scalars,
    "modules_to_save": st.none() | json_values,
}


@st.composite
def configs(draw: Any) -> bytes:
    """adapter_config.json bytes: mostly objects with a random subset of PEFT's keys, sometimes junk."""
    kind = draw(st.sampled_from(["object", "object", "object", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    keys = draw(st.lists(st.sampled_from(sorted(config_values)), unique=True))
    document = {key: draw(config_values[key]) for key in keys}
    document.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return json.dumps(document).encode()  # NaN/Infinity literals included, as Python writes them


DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "X9", "", "f32"]


@st.composite
def tensor_entries(draw: Any) -> dict[str, Any]:
    names = [f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight", "other.weight", "bad name!", "__metadata__"]
    entries: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=4)):
        if name == "__metadata__":
            entries[name] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | json_values)
            continue
        shape = draw(st.lists(st.integers(-1, 6) | st.sampled_from([2**40, 2**63, True]), max_size=3) | json_values)
        start = draw(st.integers(-8, 256))
        end = draw(st.integers(-8, 256) | st.sampled_from([2**64, 2**70]))
        offsets = draw(st.sampled_from([[start, end], [start], [start, end, 0], "0-4", None]))
        entry = {"dtype": draw(st.sampled_from(DTYPES) | json_scalars), "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()):
            entry.pop(draw(st.sampled_from(sorted(entry))))
        entries[name] = entry
    return entries


@st.composite
def safetensors_files(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "structured", "raw", "not json", "huge length"]))
    if kind == "raw":
        return draw(st.binary(max_size=96))
    if kind == "huge length":
        return struct.pack("<Q", draw(st.integers(10**8, 2**64 - 1))) + draw(st.binary(max_size=16))
    header = b"{not json" if kind == "not json" else json.dumps(draw(tensor_entries())).encode()
    header += b" " * draw(st.integers(0, 7))
    declared = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 100]))
    data = draw(st.binary(max_size=256))
    return struct.pack("<Q", max(declared, 0)) + header + data


def _validate(config: bytes | None, weights: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        if config is not None:
            (root / CONFIG_FILE).write_bytes(config)
        if weights is not None:
            (root / WEIGHTS_FILE).write_bytes(weights)
        try:
            validate_adapter(root)
        except AtmoeError as error:
            assert str(error) and "\n" not in str(error), repr(error)


GOOD_CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}).encode()
DEEP = b"[" * 100_000 + b"]" * 100_000


@FUZZ
@given(config=configs())
@example(config=DEEP)
@example(config=json.dumps({"peft_type": "LORA", "r": 2, "rank_pattern": {"(?i)q": 2}}).encode())
@example(config=json.dumps({"peft_type": "LORA", "r": 2, "rank_pattern": {"\\1": 2}}).encode())
def test_fuzzed_configs_raise_only_our_errors(config: bytes) -> None:
    import numpy as np
    from safetensors.numpy import save

    weights = save(
        {f"{MODULE}.lora_A.weight": np.ones((2, 4), np.float32), f"{MODULE}.lora_B.weight": np.ones((4, 2), np.float32)}
    )
    _validate(config, weights)


@FUZZ
@given(weights=safetensors_files())
@example(weights=struct.pack("<Q", len(DEEP)) + DEEP)
@example(weights=b"")
def test_fuzzed_safetensors_raise_only_our_errors(weights: bytes) -> None:
    _validate(GOOD_CONFIG, weights)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(config=configs(), weights=safetensors_files())
def test_fuzzed_adapters_through_add_expert_are_one_line_and_change_nothing(config: bytes, weights: bytes) -> None:
    """The whole command: exit 0, or exit 1/2 with one line on stderr; a refusal adds no row."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / CONFIG_FILE).write_bytes(config)
        (root / WEIGHTS_FILE).write_bytes(weights)
        result = invoke("add-expert", root, "--name", "fuzz", "--group", "domain")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        assert result.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("Error: "), result.output


@pytest.mark.parametrize("weights", [b"\x00" * 8, struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 4) + b"[1] "])
def test_degenerate_safetensors(weights: bytes) -> None:
    _validate(GOOD_CONFIG, weights)
