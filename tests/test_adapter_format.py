"""One adapter format: ``add-expert`` validation (no torch) and model building accept exactly the same
adapters, refuse the same ones with the same field named, and read the same scaling as PEFT."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atmoe.adapter_format import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R, parse_key, read_settings
from atmoe.adapters import load_adapter
from atmoe.errors import InvalidAdapter
from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE, read_safetensors_header, validate_adapter

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import write_adapter  # noqa: E402

PREFIX = "base_model.model.model.layers.0.self_attn."


def make_adapter(root: Path) -> Path:
    """q_proj and v_proj of one layer, r = 2, hidden 8."""
    return write_adapter(root, r=2, hidden=8)


def _raw_safetensors(gap: int = 0, trailing: int = 0) -> bytes:
    """Two F32 tensors with ``gap`` unused bytes between them and ``trailing`` bytes after them."""
    a = np.ones((2, 8), "<f4").tobytes()
    b = np.ones((8, 2), "<f4").tobytes()
    header = {
        f"{PREFIX}q_proj.lora_A.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, len(a)]},
        f"{PREFIX}q_proj.lora_B.weight": {
            "dtype": "F32",
            "shape": [8, 2],
            "data_offsets": [len(a) + gap, len(a) + gap + len(b)],
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + a + b"\0" * gap + b + b"\0" * trailing


@pytest.mark.parametrize(("gap", "trailing", "match"), [(8, 0, "unused bytes before"), (0, 8, "trailing bytes")])
def test_gaps_and_trailing_bytes_are_refused_as_the_library_does(tmp_path, gap, trailing, match):
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = _raw_safetensors(gap, trailing)
    with pytest.raises(SafetensorError):
        load(data)
    make_adapter(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(data)
    with pytest.raises(InvalidAdapter, match=match):
        read_safetensors_header(tmp_path / WEIGHTS_FILE)
    with pytest.raises(InvalidAdapter, match="corrupt or truncated"):  # no raw SafetensorError either
        load_adapter(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(_raw_safetensors())
    validate_adapter(tmp_path)


def _config(**changes: Any) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        config = json.loads((root / CONFIG_FILE).read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        (root / CONFIG_FILE).write_text(json.dumps(config))

    return edit


_DROP = object()


def _rename_keys(old: str, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(root / WEIGHTS_FILE))
        save_file({k.replace(old, new): v for k, v in tensors.items()}, str(root / WEIGHTS_FILE))

    return edit


def _add_tensor(suffix: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(root / WEIGHTS_FILE))
        tensors[f"{PREFIX}q_proj.{suffix}"] = np.ones(shape, "<f4")
        save_file(tensors, str(root / WEIGHTS_FILE))

    return edit


def _both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for one in edits:
            one(root)

    return edit


MUTATIONS = {
    "as made": lambda root: None,
    "lora_alpha missing (PEFT's default)": _config(lora_alpha=_DROP),
    "r missing (PEFT's default)": _config(r=_DROP),
    "lora_alpha zero": _config(lora_alpha=0),
    "lora_alpha negative": _config(lora_alpha=-2),
    "lora_alpha NaN": _config(lora_alpha=float("nan")),
    "scale overflows": _config(lora_alpha=1e308),
    "lora_bias without biases": _config(lora_bias=True),
    "biases without lora_bias": _add_tensor("lora_B.bias", (8,)),
    "bias of the wrong size": _both(_config(lora_bias=True), _add_tensor("lora_B.bias", (3,))),
    "DoRA magnitude without use_dora": _add_tensor("lora_magnitude_vector", (8,)),
    "DoRA and lora_bias": _config(use_dora=True, lora_bias=True),
    "lora_bias with a bias on one module only": _both(
        _config(lora_bias=True), _add_tensor("lora_B.bias", (8,)), lambda root: None
    ),
    "keys without base_model.model.": _rename_keys("base_model.model.", ""),
    "keys with an adapter name": _rename_keys(".weight", ".default.weight"),
    "modules_to_save": _config(modules_to_save=["lm_head"]),
    "target_parameters": _config(target_parameters=["experts.down_proj"]),
    "peft_type IA3": _config(peft_type="IA3"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_validation_and_loading_agree(tmp_path, mutation):
    """add-expert (validate_adapter) refuses exactly what model building (load_adapter) refuses."""
    make_adapter(tmp_path)
    MUTATIONS[mutation](tmp_path)
    try:
        validate_adapter(tmp_path)
        accepted, message = True, ""
    except InvalidAdapter as error:
        accepted, message = False, str(error)
    try:
        load_adapter(tmp_path)
        loaded, load_message = True, ""
    except InvalidAdapter as error:
        loaded, load_message = False, str(error)
    assert accepted == loaded, (message, load_message)
    if not accepted:
        assert message in load_message and "\n" not in message  # the same one line, naming the field


def test_missing_rank_and_alpha_take_peft_defaults():
    from peft import LoraConfig

    settings = read_settings({"peft_type": "LORA"})
    assert (settings.r, settings.alpha) == (PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA)
    peft_default = LoraConfig()
    assert (peft_default.r, peft_default.lora_alpha) == (PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA)
    assert settings.module_scaling("model.layers.0.q_proj") == (8, 1.0)


@pytest.mark.parametrize(
    ("key", "module", "part"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj", "A"),
        ("base_model.model.h.0.attn.c_attn.lora_B.default.weight", "h.0.attn.c_attn", "B"),
        ("base_model.model.encoder.layer.0.output.dense.lora_B.bias", "encoder.layer.0.output.dense", "B_bias"),
        ("base_model.model.x.lora_magnitude_vector", "x", "magnitude"),
        ("base_model.model.x.lora_magnitude_vector.default.weight", "x", "magnitude"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens", "embedding_A"),
        ("base_model.model.model.embed_tokens.lora_embedding_B.default", "model.embed_tokens", "embedding_B"),
        ("base_model.model.lm_head.base_layer.weight", "lm_head", "base_weight"),
    ],
)
def test_the_key_grammar(key, module, part):
    parsed = parse_key(key)
    assert (parsed.module, parsed.part) == (module, part)


@pytest.mark.parametrize("pattern", ["(a+)+", "(a|aa)*", "((q_proj)*)*", "(.*a){2,}"])
def test_patterns_that_backtrack_exponentially_are_refused_at_once(tmp_path, pattern):
    """A rank_pattern such as (a+)+ would hang add-expert and import for minutes on a long module name."""
    make_adapter(tmp_path)
    _config(rank_pattern={pattern: 2})(tmp_path)
    with pytest.raises(InvalidAdapter, match="exponential time"):
        validate_adapter(tmp_path)
    with pytest.raises(InvalidAdapter, match="exponential time"):
        load_adapter(tmp_path)


def test_flat_peft_patterns_are_accepted():
    for pattern in [r"layers\.[01]\..*q_proj", r".*layer\.\d+\..*dense", "(q|v)_proj", r"(?:.*\.)?v_proj"]:
        read_settings({"peft_type": "LORA", "rank_pattern": {pattern: 2}})


def test_absurdly_long_module_paths_are_refused():
    with pytest.raises(InvalidAdapter, match="too long"):
        parse_key("base_model.model." + "a." * 2000 + "lora_A.weight")
