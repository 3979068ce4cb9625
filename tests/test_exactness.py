"""AT-MoE under fixed weights equals PEFT itself, on tiny Llama, GPT-2 and BERT models.

References are built with PEFT only: the adapter alone, or all adapters active at once with each
adapter's scaling multiplied by its weight (``module.scaling[name] *= w``). ``add_weighted_adapter``
is not used as a reference: its concatenation mixes rsLoRA scalings wrongly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from atmoe import build_atmoe, freeze_all_but_routers
from atmoe.testing import make_peft_adapter, make_tiny_bert, make_tiny_gpt2, make_tiny_llama

ATOL = 1e-5
RTOL = 1e-5

# Each model: a base factory and adapters with varied ranks, targets, rsLoRA and rank/alpha patterns.
SPECS = {
    "llama": (
        make_tiny_llama,
        {
            "a": dict(r=4, seed=11),
            "b": dict(r=2, target_modules=["q_proj", "v_proj"], use_rslora=True, seed=12),
            "c": dict(
                r=3,
                target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                seed=13,
                rank_pattern={"q_proj": 5, "layers.1.mlp.down_proj": 1},
                alpha_pattern={"k_proj": 3},
            ),
            "g": dict(r=6, lora_alpha=4, seed=14),
        },
    ),
    "gpt2": (
        make_tiny_gpt2,
        {
            "a": dict(r=4, seed=21),
            "b": dict(r=2, target_modules=["c_attn"], use_rslora=True, seed=22),
            "c": dict(
                r=3,
                target_modules=["c_attn", "c_fc"],
                seed=23,
                rank_pattern={"c_fc": 6},
                alpha_pattern={"h.0.attn.c_attn": 1},
            ),
            "g": dict(r=5, seed=24),
        },
    ),
    "bert": (
        make_tiny_bert,
        {
            "a": dict(r=4, seed=31),
            "b": dict(r=2, target_modules=["value"], use_rslora=True, seed=32),
            "c": dict(
                r=3,
                target_modules=r".*layer\.\d+\..*dense",
                seed=33,
                rank_pattern={"intermediate.dense": 7},
                alpha_pattern={"layer.1.output.dense": 2},
            ),
            "g": dict(r=4, seed=34),
        },
    ),
}
GROUPS = {"functional": ["a", "b"], "style": ["c"]}


@pytest.fixture(scope="module", params=sorted(SPECS))
def setup(request, tmp_path_factory):
    """(name, base model, {adapter: dir}, input_ids, attention_mask) for one model family."""
    name = request.param
    make_base, adapters = SPECS[name]
    base = make_base()
    root = tmp_path_factory.mktemp(name)
    dirs = {key: make_peft_adapter(base, root / key, **spec) for key, spec in adapters.items()}
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    return name, base, dirs, ids, mask


def atmoe_model(base, dirs, **kwargs):
    groups = {group: {e: dirs[e] for e in experts} for group, experts in GROUPS.items()}
    return build_atmoe(copy.deepcopy(base), groups, **kwargs).eval()


def peft_model(base, dirs, scalings):
    """PEFT with the named adapters all active, each adapter's scaling multiplied by its factor."""
    names = list(scalings)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, factor in scalings.items():
                if name in module.scaling:
                    module.scaling[name] *= factor
    return model.eval()


def output(model, ids, mask):
    result = model(input_ids=ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@torch.no_grad()
@pytest.mark.parametrize("expert", ["a", "b", "c"])
def test_forced_one_hot_equals_peft_alone(setup, expert):
    _, base, dirs, ids, mask = setup
    model = atmoe_model(base, dirs)
    with model.forced_routing({expert: 1.0}):
        ours = output(model, ids, mask)
    reference = output(peft_model(base, dirs, {expert: 1.0}), ids, mask)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(ours, output(base, ids, mask), atol=1e-3)  # the adapter does something


@torch.no_grad()
def test_forced_weights_equal_peft_all_active(setup):
    _, base, dirs, ids, mask = setup
    weights = {"a": 0.5, "b": 0.2, "c": 0.3}
    model = atmoe_model(base, dirs)
    with model.forced_routing(weights):
        ours = output(model, ids, mask)
    torch.testing.assert_close(ours, output(peft_model(base, dirs, weights), ids, mask), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_general_expert_and_lambda_equal_peft(setup):
    _, base, dirs, ids, mask = setup
    lam, weights = 0.7, {"a": 0.6, "c": 0.4}
    model = atmoe_model(base, dirs, general=dirs["g"], lam=lam)
    with model.forced_routing(weights):
        ours = output(model, ids, mask)
    scalings = {name: lam * w for name, w in weights.items()} | {"g": 1 - lam}
    torch.testing.assert_close(ours, output(peft_model(base, dirs, scalings), ids, mask), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_live_routing_equals_peft_with_the_routed_weights(setup):
    """Untrained routers are even inside each group: a = 1/2, b = 1/2 or 1, so w = (1/4, 1/4, 1/2)."""
    _, base, dirs, ids, mask = setup
    model = atmoe_model(base, dirs)
    ours = output(model, ids, mask)
    for block in model.last_routing():
        assert block["experts"] == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
        assert block["groups"] == pytest.approx({"functional": 0.5, "style": 0.5})
    reference = output(peft_model(base, dirs, {"a": 0.25, "b": 0.25, "c": 0.5}), ids, mask)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=RTOL)


def test_gradients_reach_only_the_routers(setup):
    name, base, dirs, ids, mask = setup
    model = atmoe_model(base, dirs, general=dirs["g"], learn_lambda=True, lam=0.6)
    with torch.no_grad():  # a router away from its zero start, so every gradient path is live
        for param in model.router_parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    trainable = freeze_all_but_routers(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.router_parameters()}
    out = output(model, ids, mask)
    loss = out.float().pow(2).mean()
    loss.backward()
    routed = {id(p) for p in trainable}
    for param_name, param in model.named_parameters():
        if id(param) in routed:
            assert param.grad is not None, param_name
        else:
            assert param.grad is None and not param.requires_grad, param_name
    assert all(p.grad.abs().sum() > 0 for p in model.routers.parameters() if p.dim() == 2)
    assert all(p.grad.abs() > 0 for p in model.lambda_logits)
    # the routing tensors of the last forward keep their graph (for auxiliary losses)
    group_w, expert_w = model.last_routing_tensors()[0]
    assert expert_w.requires_grad and group_w.shape == (2, 2) and expert_w.shape == (2, 3)


@pytest.fixture
def decoder_setup(setup):
    """``setup`` for the families that generate (every one but the BERT encoder)."""
    if setup[0] == "bert":
        pytest.skip("BERT is an encoder: no generate")
    return setup


@torch.no_grad()
def test_greedy_generate_equals_peft(decoder_setup):
    name, base, dirs, ids, mask = decoder_setup
    model = atmoe_model(base, dirs)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for expert in ("a", "c"):
        with model.forced_routing({expert: 1.0}):
            ours = model.generate(input_ids=ids, **kwargs)
        reference = peft_model(base, dirs, {expert: 1.0}).generate(input_ids=ids, **kwargs)
        assert ours.shape[1] > ids.shape[1]
        assert torch.equal(ours, reference)


@torch.no_grad()
def test_token_routing_runs_and_reports_distributions(setup):
    name, base, dirs, ids, mask = setup
    model = atmoe_model(base, dirs, routing="token")
    _randomise_routers(model)
    out = output(model, ids, mask)
    assert torch.isfinite(out).all()
    group_w, expert_w = model.last_routing_tensors()[0]
    assert expert_w.shape == (*ids.shape, 3) and group_w.shape == (*ids.shape, 2)
    torch.testing.assert_close(expert_w.sum(-1), torch.ones(ids.shape))
    assert not torch.allclose(expert_w[:, 0], expert_w[:, 1])  # weights differ from token to token
    for block in model.last_routing():
        assert sum(block["experts"].values()) == pytest.approx(1.0)
    with model.forced_routing({"b": 1.0}):  # token routing under forcing is the plain adapter too
        forced = output(model, ids, mask)
    torch.testing.assert_close(forced, output(peft_model(base, dirs, {"b": 1.0}), ids, mask), atol=ATOL, rtol=RTOL)
    if name != "bert":
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        assert generated.shape == (2, ids.shape[1] + 4)


def _randomise_routers(model, seed=3, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * scale for k, v in model.router_state_dict().items()}
    model.load_router_state_dict(state)


@torch.no_grad()
def test_sequence_routing_ignores_left_padding(setup):
    name, base, dirs, _, _ = setup
    model = atmoe_model(base, dirs)
    _randomise_routers(model)
    prompt = torch.tensor([[5, 9, 17, 33]])
    other = torch.tensor([[7, 8, 9, 10, 11, 12]])
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
    ids = torch.cat([padded, other])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    model(input_ids=ids, attention_mask=mask, **kwargs)
    batched = [weights[0] for _, weights in model.last_routing_tensors()]
    model(input_ids=prompt, attention_mask=torch.ones_like(prompt))
    single = [weights[0] for _, weights in model.last_routing_tensors()]
    for got, expected in zip(batched, single):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], torch.full_like(batched[0], 1 / 3), atol=1e-3)


@torch.no_grad()
def test_decoding_reuses_the_prompt_weights(decoder_setup):
    name, base, dirs, ids, mask = decoder_setup
    model = atmoe_model(base, dirs)
    _randomise_routers(model)
    model(input_ids=ids, attention_mask=mask)
    prompt_routing = model.last_routing()
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == ids.shape[1] + 5
    assert _close(model.last_routing(), prompt_routing)
    # the same request without the cache re-routes over the longer text each step: different weights
    model(input_ids=generated, attention_mask=torch.ones_like(generated))
    assert not _close(model.last_routing(), prompt_routing)


def _close(a, b, tol=1e-5):
    return all(abs(x["experts"][k] - y["experts"][k]) < tol for x, y in zip(a, b) for k in x["experts"])
