"""A routing plan exported as one plain PEFT LoRA reproduces the mixture exactly in PEFT itself."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from atmoe import build_atmoe
from atmoe.export import export_lora
from atmoe.testing import make_peft_adapter, make_tiny_gpt2, make_tiny_llama


def _peft_output(base, adapter_dir, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forced_plan_exports_exactly(tmp_path, arch):
    base = make_tiny_llama() if arch == "llama" else make_tiny_gpt2()
    targets = ("q_proj", "v_proj", "down_proj") if arch == "llama" else ("c_attn", "c_fc")
    paths = {
        "a": make_peft_adapter(base, tmp_path / "a", r=4, target_modules=targets, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=targets[:1], use_rslora=True, seed=2),
        "c": make_peft_adapter(base, tmp_path / "c", r=3, target_modules=targets[-1:], seed=3),
    }
    general = make_peft_adapter(base, tmp_path / "g", r=2, target_modules=targets, seed=4)
    model = build_atmoe(
        copy.deepcopy(base), {"f": {"a": paths["a"], "b": paths["b"]}, "d": {"c": paths["c"]}}, general=general, lam=0.7
    )
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with model.forced_routing({"a": 0.6, "c": 0.4}), torch.no_grad():
        expected = model(input_ids=ids).logits
        out = export_lora(model, tmp_path / "plan")
    assert torch.allclose(_peft_output(base, out, ids), expected, atol=1e-5)


def test_router_plan_per_block_exports_exactly(tmp_path):
    base = make_tiny_llama()
    paths = {n: make_peft_adapter(base, tmp_path / n, r=2 + i, seed=10 + i) for i, n in enumerate("xyz")}
    model = build_atmoe(copy.deepcopy(base), {"g1": {"x": paths["x"], "y": paths["y"]}, "g2": {"z": paths["z"]}})
    with torch.no_grad():  # give the routers non-uniform, block-specific weights
        for param in model.router_parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    blocks = model.last_routing()
    assert blocks[0]["experts"] != blocks[1]["experts"]
    out = export_lora(model, tmp_path / "plan")
    assert torch.allclose(_peft_output(base, out, ids), expected, atol=1e-5)


def test_token_routing_without_force_is_refused(tmp_path):
    from atmoe.errors import RoutingError

    base = make_tiny_llama()
    path = make_peft_adapter(base, tmp_path / "a", r=2, seed=1)
    model = build_atmoe(copy.deepcopy(base), {"g": {"a": path}}, routing="token")
    with torch.no_grad():
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(RoutingError, match="--force"):
        export_lora(model, tmp_path / "plan")


@pytest.mark.parametrize("kind", ["embedding", "lora_bias"])
def test_embedding_and_lora_bias_plans_export_exactly(tmp_path, kind):
    base = make_tiny_llama()
    options = (
        {"target_modules": ["embed_tokens", "q_proj", "lm_head"]}
        if kind == "embedding"
        else {"target_modules": ["q_proj", "down_proj"], "lora_bias": True}
    )
    with (
        pytest.warns(UserWarning) if kind == "lora_bias" else contextlib.nullcontext()
    ):  # PEFT: Llama linears have no bias
        paths = {n: make_peft_adapter(base, tmp_path / n, r=2 + i, seed=20 + i, **options) for i, n in enumerate("xy")}
    model = build_atmoe(copy.deepcopy(base), {"g": {"x": paths["x"], "y": paths["y"]}})
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with model.forced_routing({"x": 0.7, "y": 0.3}), torch.no_grad():
        expected = model(input_ids=ids).logits
        out = export_lora(model, tmp_path / "plan")
    torch.testing.assert_close(_peft_output(base, out, ids), expected, atol=1e-5, rtol=1e-5)


def test_dora_plans_are_refused_with_the_reason(tmp_path):
    from atmoe.errors import AtmoeError

    base = make_tiny_llama()
    path = make_peft_adapter(base, tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True, seed=3)
    model = build_atmoe(copy.deepcopy(base), {"g": {"d": path}})
    with model.forced_routing({"d": 1.0}), torch.no_grad():
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(AtmoeError, match="DoRA.*no LoRA"):
            export_lora(model, tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


def _merged(A, B):
    return B.double() @ A.double()


def test_rank_limited_export_is_exact_at_the_full_rank_and_its_error_falls_with_the_rank(tmp_path):
    from atmoe.export import export_plan, truncate

    base = make_tiny_llama()
    targets = ("q_proj", "v_proj")
    paths = {
        n: make_peft_adapter(base, tmp_path / n, r=4, target_modules=targets, seed=30 + i) for i, n in enumerate("abc")
    }
    model = build_atmoe(copy.deepcopy(base), {"g": {n: paths[n] for n in "abc"}})
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with model.forced_routing({"a": 0.5, "b": 0.3, "c": 0.2}), torch.no_grad():
        expected = model(input_ids=ids).logits
        full = export_plan(model, tmp_path / "full", rank=12)  # 3 x 4 = the plan's whole rank
        assert full.max_error == 0.0
        torch.testing.assert_close(_peft_output(base, full.path, ids), expected, atol=1e-5, rtol=1e-5)
        errors = [export_plan(model, tmp_path / f"k{k}", rank=k).max_error for k in (1, 2, 4, 8, 11)]
        assert all(e1 >= e2 for e1, e2 in zip(errors, errors[1:])) and errors[0] > errors[-1] > 0
        capped = export_plan(model, tmp_path / "k4", rank=4)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(capped.path))
    assert all(m.r["default"] <= 4 for m in peft.modules() if hasattr(m, "r") and isinstance(m.r, dict) and m.r)
    # the reported error is the Frobenius error of the truncated update, checked independently
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 20, generator=generator), torch.randn(10, 6, generator=generator)
    a_k, b_k, error = truncate(A, B, 3)
    exact = _merged(A, B)
    assert a_k.shape == (3, 20) and b_k.shape == (10, 3)
    assert error == pytest.approx(float((exact - _merged(a_k, b_k)).norm() / exact.norm()), rel=1e-6)
    singular = torch.linalg.svdvals(exact)
    assert error == pytest.approx(float(singular[3:].norm() / singular.norm()), rel=1e-6)  # Eckart-Young
