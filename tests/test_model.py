"""Building compositions and the AtMoEModel surface: validation, forcing, router weights, ablations."""

from __future__ import annotations

import copy

import pytest
import torch

from atmoe import AtMoEModel, build_atmoe, freeze_all_but_routers, router_parameters
from atmoe.config import AtmoeConfig
from atmoe.errors import AtmoeError, InvalidComposition, RoutingError, UsageError
from atmoe.layer import MixtureLoraLinear
from atmoe.router import FlatRouter, GroupedRouter
from atmoe.testing import make_random_adapter, make_tiny_bert, make_tiny_gpt2, make_tiny_llama


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def experts(llama):
    return {
        "diagnosis": make_random_adapter(llama, r=2, seed=1),
        "prescribe": make_random_adapter(llama, r=3, target_modules=["q_proj", "v_proj"], seed=2),
        "gastro": make_random_adapter(llama, r=4, target_modules=["down_proj"], seed=3, use_rslora=True),
        "general": make_random_adapter(llama, r=2, target_modules=["o_proj"], seed=4),
    }


def compose(llama, experts, **kwargs):
    groups = {
        "functional": {"diagnosis": experts["diagnosis"], "prescribe": experts["prescribe"]},
        "domain": {"gastro": experts["gastro"]},
    }
    return build_atmoe(copy.deepcopy(llama), groups, **kwargs)


IDS = torch.tensor([[4, 8, 15, 16, 23, 42], [3, 5, 7, 11, 13, 17]])


def test_layout_and_names(llama, experts):
    model = compose(llama, experts)
    assert isinstance(model, AtMoEModel)
    assert model.group_names == ["functional", "domain"]
    assert model.expert_names == ["diagnosis", "prescribe", "gastro"]
    assert model.expert_groups == {"diagnosis": "functional", "prescribe": "functional", "gastro": "domain"}
    assert (model.n_groups, model.n_max, model.num_blocks) == (2, 2, 2)
    assert model.block_paths == ["model.layers.0", "model.layers.1"]
    assert model.config is model.base_model.config
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.can_generate() and model.generation_config is model.base_model.generation_config
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MixtureLoraLinear) and layer.A_cat.shape == (5, 32)  # ranks 2 + 3
    assert isinstance(model.base_model.model.layers[0].mlp.down_proj, MixtureLoraLinear)
    # the untrained routers split evenly over groups, then over each group's experts
    model(input_ids=IDS)
    for block in model.last_routing():
        assert block["groups"] == pytest.approx({"functional": 0.5, "domain": 0.5})
        assert block["experts"] == pytest.approx({"diagnosis": 0.25, "prescribe": 0.25, "gastro": 0.5})


def test_only_blocks_with_adapted_modules_get_routers(llama):
    one_block = make_random_adapter(llama, r=2, target_modules=["q_proj"])
    one_block.tensors = {k: v for k, v in one_block.tensors.items() if "layers.1." in k}
    one_block.__post_init__()
    model = build_atmoe(copy.deepcopy(llama), {"g": {"x": one_block}})
    assert model.block_paths == ["model.layers.1"] and len(model.routers) == 1
    model(input_ids=IDS)
    assert len(model.last_routing()) == 1


@pytest.mark.parametrize(
    "groups, message",
    [
        ({}, "at least one group"),
        ({"functional": {}}, "group 'functional' is empty"),
        ({"a": {"x": "E1"}, "b": {"x": "E2"}}, "'x' appears twice"),
    ],
)
def test_bad_group_specs(llama, experts, groups, message):
    groups = {
        g: {n: experts["diagnosis"] if s == "E1" else experts["gastro"] for n, s in m.items()}
        for g, m in groups.items()
    }
    with pytest.raises(InvalidComposition, match=message):
        build_atmoe(copy.deepcopy(llama), groups)


def test_adapters_of_another_base_model_are_refused(llama, experts):
    other = make_random_adapter(make_tiny_llama(hidden=16, intermediate=24), r=2, name="small")
    with pytest.raises(InvalidComposition, match="small on .* do not fit"):
        build_atmoe(copy.deepcopy(llama), {"g": {"small": other}})
    gpt2_adapter = make_random_adapter(make_tiny_gpt2(), r=2, name="gpt")
    with pytest.raises(InvalidComposition, match="gpt adapts transformer.h.0.*does not have"):
        build_atmoe(copy.deepcopy(llama), {"g": {"gpt": gpt2_adapter}})


def test_modules_outside_blocks_take_their_nearest_blocks_routing(llama):
    """lm_head runs after the blocks: it is mixed with the last block's weights (a router is made
    for that block even when the adapter adapts nothing inside it)."""
    head = make_random_adapter(llama, r=2, target_modules=["lm_head"], name="head")
    model = build_atmoe(copy.deepcopy(llama), {"g": {"head": head}})
    assert model.block_paths == ["model.layers.1"]
    assert isinstance(model.base_model.lm_head, MixtureLoraLinear)
    model(input_ids=IDS)
    assert model.last_routing()[0]["experts"] == {"head": 1.0}
    coefficients = model.base_model.lm_head.routing.coefficients  # [B, 1, E + 1]: the last block's
    assert coefficients.shape == (2, 1, 2) and coefficients[..., 0].eq(1.0).all()


def test_building_twice_on_the_same_base_is_refused(llama, experts):
    base = copy.deepcopy(llama)
    build_atmoe(base, {"g": {"d": experts["diagnosis"]}})
    with pytest.raises(InvalidComposition, match="already holds mixture layers"):
        build_atmoe(base, {"g": {"d": experts["diagnosis"]}})


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(lam=0.5), "--lambda below 1 needs a --general expert"),
        (dict(temperature=0.0), "--temperature"),
        (dict(temperature=float("nan")), "--temperature"),
        (dict(routing="paragraph"), "--routing"),
        (dict(router="deep"), "--router"),
        (dict(router="flat", static_inside=True), "--static-inside"),
        (dict(learn_lambda=True), "--learn-lambda"),
    ],
)
def test_bad_settings_name_the_flag(llama, experts, kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        compose(llama, experts, **kwargs)


def test_config_resolves_lambda():
    assert AtmoeConfig().lam == 1.0
    assert AtmoeConfig(general=True).lam == 0.5
    assert AtmoeConfig(general=True, lam=0.2).lam == 0.2
    with pytest.raises(UsageError, match="--lambda must be"):
        AtmoeConfig(general=True, lam=1.5)
    with pytest.raises(UsageError, match="strictly between"):
        AtmoeConfig(general=True, lam=1.0, learn_lambda=True)
    config = AtmoeConfig(general=True, lam=0.3, routing="token")
    assert AtmoeConfig.from_dict(config.to_dict()) == config
    assert all(f.metadata.get("help") for f in __import__("dataclasses").fields(AtmoeConfig))


def test_forced_routing_validation_and_restore(llama, experts):
    model = compose(llama, experts)
    for bad, message in [
        ({"nobody": 1.0}, "unknown expert 'nobody'"),
        ({"gastro": -0.1}, ">= 0"),
        ({"gastro": float("inf")}, "finite"),
        ({"gastro": "1"}, "finite"),
        ([1.0], "mapping"),
    ]:
        with pytest.raises(RoutingError, match=message):
            with model.forced_routing(bad):
                pass
    with torch.no_grad(), model.forced_routing({"gastro": 2.0}):  # not renormalised, missing names 0
        model(input_ids=IDS)
        assert model.last_routing()[0]["experts"] == {"diagnosis": 0.0, "prescribe": 0.0, "gastro": 2.0}
        assert model.last_routing()[0]["groups"] == {"functional": 0.0, "domain": 2.0}
    model(input_ids=IDS)  # after the block: the routers route again
    assert model.last_routing()[0]["experts"]["gastro"] == pytest.approx(0.5)


def test_forcing_nothing_gives_the_base_model(llama, experts):
    model = compose(llama, experts)
    with torch.no_grad(), model.forced_routing({}):
        ours = model(input_ids=IDS).logits
        torch.testing.assert_close(ours, llama(input_ids=IDS).logits)


def test_last_routing_before_any_forward_is_an_error(llama, experts):
    with pytest.raises(AtmoeError, match="no routing yet"):
        compose(llama, experts).last_routing()


def test_router_state_dict_round_trip_and_strictness(llama, experts):
    model = compose(llama, experts, general=experts["general"], learn_lambda=True, lam=0.4)
    state = model.router_state_dict()
    assert set(state) == {f"routers.{i}.{p}" for i in range(2) for p in ("W_G", "b_G", "W_D", "b_D")} | {
        f"router_inputs.{i}.{b}" for i in range(2) for b in ("shift", "scale")
    } | {"lambda_logits.0", "lambda_logits.1"}
    assert state["routers.0.W_G"].shape == (32, 2) and state["routers.0.W_D"].shape == (32, 4)
    assert torch.sigmoid(state["lambda_logits.0"]).item() == pytest.approx(0.4)
    changed = {k: torch.randn(v.shape) for k, v in state.items()}
    other = compose(llama, experts, general=experts["general"], learn_lambda=True, lam=0.4)
    other.load_router_state_dict(changed)
    for key, value in other.router_state_dict().items():
        assert torch.equal(value, changed[key])
    with torch.no_grad():
        model.load_router_state_dict(changed)
        torch.testing.assert_close(model(input_ids=IDS).logits, other(input_ids=IDS).logits)
    with pytest.raises(AtmoeError, match="missing routers.0.W_G"):
        other.load_router_state_dict({k: v for k, v in changed.items() if k != "routers.0.W_G"})
    with pytest.raises(AtmoeError, match="unexpected"):
        other.load_router_state_dict({**changed, "routers.9.W_G": torch.zeros(1)})
    with pytest.raises(AtmoeError, match="shape"):
        other.load_router_state_dict({**changed, "routers.0.W_G": torch.zeros(32, 3)})
    legacy = {k: v for k, v in changed.items() if not k.startswith("router_inputs.")}
    other.load_router_state_dict(legacy)  # saved before inputs were standardised: identity
    assert torch.equal(other.router_inputs[0].scale, torch.ones(32)) and torch.equal(
        other.router_inputs[1].shift, torch.zeros(32)
    )
    flat = compose(llama, experts, router="flat")
    with pytest.raises(AtmoeError):
        flat.load_router_state_dict(compose(llama, experts).router_state_dict())


def test_calibration_standardizes_each_blocks_router_input(llama, experts):
    model = compose(llama, experts, shared_router=True)
    batches = [torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    from atmoe.routing import pool_hidden

    with torch.no_grad():
        for ids in batches:  # the pooled router inputs, by hand
            out = model.base_model(input_ids=ids, output_hidden_states=True)
            for block in seen:
                seen[block].append(pool_hidden(out.hidden_states[block], None))
        with model.calibrating_router_inputs():
            for ids in batches:
                model(input_ids=ids)
    for block, norm in enumerate(model.router_inputs):
        pooled = torch.cat(seen[block])  # [12, D]
        torch.testing.assert_close(norm.shift, pooled.mean(0), atol=1e-5, rtol=1e-4)
        standardized = norm(pooled)
        torch.testing.assert_close(
            standardized.std(0, unbiased=False), torch.ones(pooled.shape[1]), atol=1e-2, rtol=1e-2
        )
    # the shared router still gets per-block inputs; zero weights still route uniformly
    model(input_ids=IDS)
    assert model.last_routing()[1]["experts"] == pytest.approx(model.last_routing()[0]["experts"])
    state = model.router_state_dict()
    assert "router_inputs.1.scale" in state and "routers.1.W_G" not in state


def test_token_routing_calibrates_on_real_tokens_only(llama, experts):
    model = compose(llama, experts, routing="token")
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
        with model.calibrating_router_inputs():
            model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model.router_inputs[0].shift, hidden[mask.bool()].mean(0), atol=1e-5, rtol=1e-4)


def test_ablations_build_and_route(llama, experts):
    flat = compose(llama, experts, router="flat")
    assert all(isinstance(r, FlatRouter) for r in flat.routers)
    flat(input_ids=IDS)
    assert flat.last_routing()[0]["experts"] == pytest.approx({e: 1 / 3 for e in flat.expert_names})
    assert flat.last_routing()[0]["groups"] == pytest.approx({"functional": 2 / 3, "domain": 1 / 3})
    shared = compose(llama, experts, shared_router=True)
    assert len(shared.routers) == 1 and len(router_parameters(shared)) == 4
    shared(input_ids=IDS)
    assert len(shared.last_routing()) == 2
    static = compose(llama, experts, static_inside=True)
    assert isinstance(static.routers[0], GroupedRouter) and "routers.0.inside_table" in static.router_state_dict()
    static(input_ids=IDS)


def test_temperature_changes_sharpness(llama, experts):
    model = compose(llama, experts)
    with torch.no_grad():
        for param in model.router_parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    model.set_temperature(1e-4)
    model(input_ids=IDS[:1])
    assert max(model.last_routing()[0]["experts"].values()) == pytest.approx(1.0, abs=1e-3)
    model.set_temperature(1e6)
    model(input_ids=IDS[:1])
    assert model.last_routing()[0]["experts"] == pytest.approx(
        {"diagnosis": 0.25, "prescribe": 0.25, "gastro": 0.5}, abs=1e-3
    )
    with pytest.raises(UsageError, match="--temperature"):
        model.set_temperature(-1)


def test_freeze_leaves_only_router_parameters_trainable(llama, experts):
    model = compose(llama, experts, general=experts["general"], learn_lambda=True)
    trainable = freeze_all_but_routers(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if n.startswith(("routers.", "lambda_logits."))
    }
    assert len(trainable) == len(model.router_parameters()) == 2 * 4 + 2


def test_bfloat16_model_keeps_float32_routers(llama, experts):
    model = compose(llama, experts).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.router_parameters())
    assert model.base_model.model.layers[0].self_attn.q_proj.A_cat.dtype == torch.bfloat16
    out = model(input_ids=IDS)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert model.last_routing_tensors()[0][1].dtype == torch.float32


def test_router_input_accepts_positional_calls_and_bert(llama, experts):
    model = compose(llama, experts)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        for param in model.router_parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
    model(IDS, mask)  # a positional attention_mask is the request's mask too
    positional = model.last_routing()
    model(input_ids=IDS, attention_mask=mask)
    assert model.last_routing() == positional
    model(input_ids=IDS)  # without it every token is pooled: other weights
    assert model.last_routing() != positional
    bert = make_tiny_bert()
    adapter = make_random_adapter(bert, r=2, target_modules=["query", "value"])
    composed = build_atmoe(copy.deepcopy(bert), {"g": {"q": adapter}})
    assert composed.block_paths == ["encoder.layer.0", "encoder.layer.1"]
    composed(input_ids=IDS, attention_mask=mask)
    assert composed.last_routing()[0]["experts"] == {"q": 1.0}


def test_deepcopy_routes_the_copy(llama, experts):
    model = compose(llama, experts)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.router_parameters():
            param.normal_(generator=torch.Generator().manual_seed(2))
    twin(input_ids=IDS)
    model(input_ids=IDS[:1])
    # each routes its own input
    assert len(twin.last_routing_tensors()[0][1]) == 2 and len(model.last_routing_tensors()[0][1]) == 1
    assert twin.last_routing() != model.last_routing()


def test_gradient_checkpointing_gives_the_same_router_gradients(llama, experts):
    grads = []
    for checkpointing in (False, True):
        model = compose(llama, experts)
        with torch.no_grad():
            for param in model.router_parameters():
                param.normal_(generator=torch.Generator().manual_seed(4))
        freeze_all_but_routers(model)
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in model.router_parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)
