"""Reading LoRA adapters: safetensors only, and the per-module (r, scaling) exactly as PEFT resolves it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from atmoe.adapters import LoraAdapter, load_adapter, module_scaling, save_adapter
from atmoe.errors import InvalidAdapter, PickleRefused
from atmoe.testing import make_peft_adapter, make_random_adapter, make_tiny_gpt2, make_tiny_llama


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(layers=2)


@pytest.mark.parametrize(
    "options",
    [
        dict(r=4),
        dict(r=4, use_rslora=True, lora_alpha=3),
        dict(r=3, rank_pattern={"q_proj": 5, "layers.1.mlp.down_proj": 1}, alpha_pattern={"k_proj": 7}),
        dict(r=2, use_rslora=True, rank_pattern={r"layers\.[01]\.self_attn\.v_proj": 6}, alpha_pattern={"proj": 5}),
        # two patterns match layers.0.mlp.up_proj: the first in the config's order wins, as in PEFT
        # (PEFT writes adapter_config.json with sorted keys, so only a sorted order survives a reload)
        dict(r=2, rank_pattern={"0.mlp.up_proj": 8, "up_proj": 3}, alpha_pattern={"mlp.up_proj": 9, "up_proj": 1}),
    ],
)
def test_module_scaling_matches_peft(llama, tmp_path, options):
    path = make_peft_adapter(llama, tmp_path / "a", seed=1, **options)
    config = json.loads((path / "adapter_config.json").read_text())
    peft = PeftModel.from_pretrained(copy.deepcopy(llama), str(path))
    checked = 0
    for key, module in peft.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            assert module_scaling(config, key) == (module.r["default"], pytest.approx(module.scaling["default"]))
            checked += 1
    assert checked == 14
    adapter = load_adapter(path)
    assert len(adapter.module_keys) == 14
    a, b = adapter.lora_pair("model.layers.0.self_attn.q_proj")
    assert a.shape[1] == 32 and b.shape[0] == 32 and a.shape[0] == b.shape[1]


def test_gpt2_conv1d_adapters_are_stored_as_linear_ones(tmp_path):
    base = make_tiny_gpt2()
    adapter = load_adapter(make_peft_adapter(base, tmp_path / "g", r=3))
    a, b = adapter.lora_pair("transformer.h.0.attn.c_attn")
    assert a.shape == (3, 32) and b.shape == (96, 3)  # [r, in] and [out, r] despite fan_in_fan_out


def test_pickle_weights_are_refused_and_never_opened(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle: must never be read")
    with pytest.raises(PickleRefused, match="adapter_model.bin.*safe_serialization=True"):
        load_adapter(tmp_path)
    with pytest.raises(PickleRefused):
        load_adapter(tmp_path / "adapter_model.bin")
    assert issubclass(PickleRefused, InvalidAdapter)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(
                (p / "adapter_model.safetensors").read_bytes()[:100]
            ),
            "corrupt or truncated",
        ),
        (lambda p: _edit_config(p, r=5), "config says r = 5"),
        (lambda p: _edit_config(p, peft_type="IA3"), "only LORA"),
        (lambda p: _edit_config(p, use_dora=True), "no lora_magnitude_vector but the config sets use_dora"),
    ],
)
def test_broken_adapters_raise_invalid_adapter(llama, tmp_path, damage, message):
    path = make_peft_adapter(llama, tmp_path / "a", r=2, target_modules=["q_proj"])
    damage(path)
    with pytest.raises(InvalidAdapter, match=message):
        load_adapter(path)


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_nan_weights_and_stray_tensors_are_refused(llama):
    adapter = make_random_adapter(llama, r=2, target_modules=["q_proj"])
    tensors = dict(adapter.tensors)
    key = next(iter(tensors))
    with pytest.raises(InvalidAdapter, match="NaN"):
        LoraAdapter(adapter.config, {**tensors, key: tensors[key] * float("nan")})
    with pytest.raises(InvalidAdapter, match="not a LoRA"):
        LoraAdapter(adapter.config, {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(InvalidAdapter, match="has no lora_B.weight"):
        LoraAdapter(adapter.config, {k: v for k, v in tensors.items() if "lora_B" not in k})


def test_save_and_load_round_trip(llama, tmp_path):
    adapter = make_random_adapter(llama, r=3, target_modules=["q_proj", "down_proj"], use_rslora=True, name="x")
    loaded = load_adapter(save_adapter(adapter, tmp_path / "x"))
    assert loaded.name == "x" and loaded.config == adapter.config
    assert loaded.module_keys == adapter.module_keys
    for key in adapter.tensors:
        assert torch.equal(loaded.tensors[key], adapter.tensors[key])
    peft = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "x"))  # PEFT reads it too
    assert peft.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 3
