"""Every valid PEFT LoRA of a supported base model composes exactly: lora_bias, DoRA, embeddings,
modules outside the blocks (lm_head, BERT's pooler), layers_to_transform; on tiny Llama, GPT-2, BERT.

References are PEFT's own:

- one expert forced at weight 1 equals ``PeftModel`` with that adapter alone;
- fixed weights, plain-LoRA kinds: PEFT with the adapters all active, each adapter's scaling
  multiplied by its weight (as in test_exactness.py);
- fixed weights, DoRA: PEFT with several DoRA adapters active is not a mixture (each adapter's
  rescaling reads the running sum of the ones before it), so the reference mixes PEFT's own
  single-adapter layers: every adapted layer computes base(x) + sum_e c_e (peft_layer_e(x) - base(x)),
  which is DESIGN.md's W0 x (1 + sum_e c_e (g_e - 1)) + sum_e c_e s_e g_e B_e A_e x.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from atmoe import build_atmoe
from atmoe.layer import MixtureLoraEmbedding, MixtureLoraLinear
from atmoe.registry.validate import validate_adapter
from atmoe.testing import make_peft_adapter, make_tiny_bert, make_tiny_gpt2, make_tiny_llama

sys.path.insert(0, str(Path(__file__).parent))
from peft_reference import outputs, peft_layerwise_mixture, peft_scaled, peft_with  # noqa: E402

ATOL = RTOL = 1e-5

KINDS = {
    "llama": (
        make_tiny_llama,
        {
            "bias": dict(r=3, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True),
            "dora": dict(r=2, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
            "embed": dict(r=2, target_modules=["embed_tokens", "q_proj", "lm_head"]),
            "layers": dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
        },
    ),
    "gpt2": (
        make_tiny_gpt2,
        {
            "bias": dict(r=3, target_modules=["c_attn", "c_fc"], lora_bias=True),
            "dora": dict(r=2, target_modules=["c_attn", "c_proj"], use_dora=True),
            "embed": dict(r=2, target_modules=["wte", "c_attn"]),
            "layers": dict(r=2, target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h"),
        },
    ),
    "bert": (
        make_tiny_bert,
        {
            "pooler": dict(r=2, target_modules=["query", "key", "value", "dense"]),  # includes pooler.dense
            "bias": dict(r=3, target_modules=["query", "value"], lora_bias=True),
            "dora": dict(r=2, target_modules=["query", "dense"], use_dora=True),
            "embed": dict(r=2, target_modules=["word_embeddings", "query"]),
            "layers": dict(r=2, target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer"),
        },
    ),
}
CASES = [(family, kind) for family, (_, kinds) in KINDS.items() for kind in kinds]


@pytest.fixture(scope="module")
def bases():
    return {family: make() for family, (make, _) in KINDS.items()}


@pytest.fixture(scope="module")
def adapter_dirs(bases, tmp_path_factory):
    """{family: {kind: dir, "plain": dir}}: each kind's adapter and a plain one to mix it with."""
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on bias-free layers, tied embeddings
        for family, (_, kinds) in KINDS.items():
            root = tmp_path_factory.mktemp(family)
            dirs[family] = {
                kind: make_peft_adapter(bases[family], root / kind, seed=seed + 40, **spec)
                for seed, (kind, spec) in enumerate(kinds.items())
            }
            dirs[family]["plain"] = make_peft_adapter(bases[family], root / "plain", r=4, seed=7)
    return dirs


def inputs():
    ids = torch.tensor([[5, 9, 17, 33, 4, 12], [7, 8, 9, 10, 11, 3]])
    return ids, torch.ones_like(ids)


def compose(base, dirs, kind):
    return build_atmoe(copy.deepcopy(base), {"kinds": {kind: dirs[kind]}, "plain": {"plain": dirs["plain"]}}).eval()


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_add_expert_validation_accepts_the_adapter(adapter_dirs, family, kind):
    info = validate_adapter(adapter_dirs[family][kind])
    assert info.module_ranks and info.use_dora == (kind == "dora") and info.lora_bias == (kind == "bias")


@torch.no_grad()
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_one_expert_forced_equals_peft_alone(bases, adapter_dirs, family, kind):
    base, dirs = bases[family], adapter_dirs[family]
    model = compose(base, dirs, kind)
    ids, mask = inputs()
    with model.forced_routing({kind: 1.0}):
        ours = outputs(model, ids, mask)
    reference = outputs(peft_with(base, dirs, [kind]), ids, mask)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert any(not torch.allclose(got, plain, atol=1e-4) for got, plain in zip(ours, outputs(base, ids, mask)))


@torch.no_grad()
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_fixed_weights_equal_peft_with_each_adapter_scaled(bases, adapter_dirs, family, kind):
    base, dirs = bases[family], adapter_dirs[family]
    model = compose(base, dirs, kind)
    ids, mask = inputs()
    weights = {kind: 0.6, "plain": 0.4}
    with model.forced_routing(weights):
        ours = outputs(model, ids, mask)
    reference_model = (peft_layerwise_mixture if kind == "dora" else peft_scaled)(base, dirs, weights)
    for got, expected in zip(ours, outputs(reference_model, ids, mask)):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_the_layerwise_reference_is_peft_scaled_for_plain_lora(bases, adapter_dirs):
    """The DoRA reference is the plain one where both apply: they agree on plain LoRA experts."""
    base, dirs = bases["llama"], adapter_dirs["llama"]
    ids, mask = inputs()
    weights = {"layers": 0.3, "plain": 0.7}
    torch.testing.assert_close(
        outputs(peft_layerwise_mixture(base, dirs, weights), ids, mask)[0],
        outputs(peft_scaled(base, dirs, weights), ids, mask)[0],
        atol=1e-5,
        rtol=1e-5,
    )


def test_outside_modules_take_the_nearest_blocks_routing(bases, adapter_dirs):
    llama = compose(bases["llama"], adapter_dirs["llama"], "embed")
    inner = llama.base_model
    assert isinstance(inner.model.embed_tokens, MixtureLoraEmbedding)
    assert inner.model.embed_tokens.routing is inner.model.layers[0].self_attn.q_proj.routing  # the first block
    assert isinstance(inner.lm_head, MixtureLoraLinear)
    assert inner.lm_head.routing is inner.model.layers[-1].self_attn.q_proj.routing  # the last block
    bert = compose(bases["bert"], adapter_dirs["bert"], "pooler")
    assert isinstance(bert.base_model.pooler.dense, MixtureLoraLinear)
    assert bert.base_model.pooler.dense.routing is bert.base_model.encoder.layer[1].attention.self.query.routing


@torch.no_grad()
def test_adapted_embeddings_route_the_first_block_once_on_the_base_embeddings(bases, adapter_dirs):
    """Live routing with an adapted embedding: the first block's weights come from the base token
    embeddings, and the embedding and the block use the same weights; generate holds them."""
    model = compose(bases["llama"], adapter_dirs["llama"], "embed")
    generator = torch.Generator().manual_seed(3)
    model.load_router_state_dict(
        {
            k: (torch.randn(v.shape, generator=generator) if k.startswith("routers.") else v)
            for k, v in model.router_state_dict().items()
        }
    )
    ids, mask = inputs()
    out = model(input_ids=ids, attention_mask=mask).logits
    first = model.last_routing_tensors()[0][1]  # [B, E]
    embedded = bases["llama"].model.embed_tokens(ids)
    expected = model.routers[0](model.router_inputs[0](embedded.mean(1)), 1.0)[1]
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(out).all()
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, ids.shape[1] + 3)
    torch.testing.assert_close(model.last_routing_tensors()[0][1], first)


@torch.no_grad()
def test_a_pooler_under_token_routing_takes_each_rows_mean_weights(bases, adapter_dirs):
    """BERT's pooler sees [B, D], no token axis: under token routing it takes its block's weights
    averaged over each row's real tokens. Untrained routers give every token the same weights (even
    over the two groups), so the mean is those weights and the output is PEFT's with them."""
    base, dirs = bases["bert"], adapter_dirs["bert"]
    groups = {"kinds": {"pooler": dirs["pooler"]}, "plain": {"plain": dirs["plain"]}}
    model = build_atmoe(copy.deepcopy(base), groups, routing="token").eval()
    ids, mask = inputs()
    mask = mask.clone()
    mask[1, -2:] = 0  # padding must not change the pooled weights either
    ours = outputs(model, ids, mask)
    reference = outputs(peft_scaled(base, dirs, {"pooler": 0.5, "plain": 0.5}), ids, mask)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
