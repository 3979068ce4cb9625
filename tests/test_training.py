"""Router training pieces: training routes like inference, the intent loss, frozen experts."""

from __future__ import annotations

import copy

import pytest
import torch

from atmoe import build_atmoe
from atmoe.testing import make_peft_adapter, make_tiny_llama
from atmoe.training import TrainConfig, routing_loss


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    base = make_tiny_llama()
    paths = {n: make_peft_adapter(base, root / n, r=2, seed=i) for i, n in enumerate(["a", "b", "c"])}
    built = build_atmoe(copy.deepcopy(base), {"g1": {"a": paths["a"], "b": paths["b"]}, "g2": {"c": paths["c"]}})
    with torch.no_grad():
        for param in built.router_parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    return built


def test_routing_mask_routes_prompt_plus_response_like_the_prompt_alone(model):
    prompt = torch.tensor([[5, 9, 11, 3]])
    full = torch.cat([prompt, torch.tensor([[7, 8, 20]])], 1)  # prompt + response
    with torch.no_grad():
        model(input_ids=prompt)
        alone = model.last_routing()
        mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
        model(input_ids=full, routing_mask=mask)
        masked = model.last_routing()
        model(input_ids=full)
        unmasked = model.last_routing()
    for a, m in zip(alone, masked):
        for name in a["experts"]:
            assert m["experts"][name] == pytest.approx(a["experts"][name], abs=1e-6)
    assert unmasked[0]["experts"]["a"] != pytest.approx(alone[0]["experts"]["a"], abs=1e-6)


def test_routing_loss_pulls_towards_intents_and_reaches_only_routers(model):
    from atmoe.freeze import freeze_all_but_routers

    freeze_all_but_routers(model)
    model.train()
    model(input_ids=torch.tensor([[5, 9, 11], [4, 4, 6]]))
    intents = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # row 2 has no intents: no loss
    loss = routing_loss(model, intents)
    loss.backward()
    trainable = {id(p) for p in model.router_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
    assert float(routing_loss(model, torch.zeros(2, 3))) == 0.0


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("epochs", 0, "--epochs"),
        ("lr", -1.0, "--lr"),
        ("batch_size", 0, "--batch-size"),
        ("mixed_precision", "fp8", "--mixed-precision"),
        ("routing_loss_weight", -1.0, "--routing-loss-weight"),
        ("schedule", "step", "--schedule"),
        ("warmup_ratio", 1.0, "--warmup-ratio"),
        ("warmup_ratio", -0.1, "--warmup-ratio"),
    ],
)
def test_config_names_the_flag(field, value, flag):
    from atmoe.errors import UsageError

    with pytest.raises(UsageError, match=flag):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_factor_warms_up_then_follows_the_schedule(schedule):
    from atmoe.training import lr_factor

    factor = lr_factor(schedule, 0.1, 100)
    values = [factor(step) for step in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0  # warm-up over the first 10 steps
    assert values[10] == pytest.approx(1.0)
    after = values[10:]
    assert all(b <= a for a, b in zip(after, after[1:]))  # never rises after the warm-up
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert values[-1] < 0.05  # decays to (nearly) 0 by the last step
    assert lr_factor(schedule, 0.0, 10)(0) == pytest.approx(1.0)  # no warm-up: the full rate at once
