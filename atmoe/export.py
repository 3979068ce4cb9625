"""Exporting a routing plan as one plain PEFT LoRA adapter.

With the weights fixed, every adapted layer computes W0 x + B_cat diag(c) A_cat x, where c holds
lambda w_e s_e for each expert's rank rows and (1 - lambda) s_p for the general expert's: that is one
standard LoRA of rank sum r_e (concatenation) with the coefficients folded into B and scaling 1.
The plan may differ per block (a trained router's choice for one prompt), since each layer belongs
to one block. Rank rows whose coefficient is exactly 0 are dropped, so a one-hot plan exports the
chosen expert at its own rank. Any PEFT or vLLM user can load the result.

Adapted embeddings export as ``lora_embedding_A/B`` the same way. Experts with ``lora_bias`` export
with ``lora_bias`` and each layer's bias sum_e c_e s_e b_e (zero where no expert has one); PEFT
refuses lora_bias on embeddings, so that combination is refused. A DoRA mixture rescales the base
weights per output row, which no LoRA expresses: refused with that reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atmoe.errors import AtmoeError, RoutingError
from atmoe.layer import MixtureLoraEmbedding, MixtureLoraLinear


def _fan_in_fan_out(layer: MixtureLoraLinear) -> bool:
    return not isinstance(layer.base_layer, torch.nn.Linear)


def plan_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, int], bool, bool]:
    """The LoRA tensors of the current plan (after a forward): PEFT keys, per-module ranks,
    fan_in_fan_out, lora_bias.

    Uses each block's coefficients of the last forward, batch row 0; token routing must be forced.
    """
    if model.atmoe_config.routing == "token" and model._forced is None:
        raise RoutingError("token routing has no single plan: export with forced weights (--force)")
    layers = [
        (path, layer)
        for path, layer in model.base_model.named_modules()
        if isinstance(layer, (MixtureLoraLinear, MixtureLoraEmbedding))
    ]
    lora_bias = any(isinstance(layer, MixtureLoraLinear) and layer.bias_rows is not None for _, layer in layers)
    for path, layer in layers:
        if isinstance(layer, MixtureLoraLinear) and layer.gain_rows is not None:
            raise AtmoeError(
                f"{path} mixes DoRA experts: their rescaling of the base weights is no LoRA, "
                "so the plan cannot be exported as one"
            )
        if lora_bias and isinstance(layer, MixtureLoraEmbedding):
            raise AtmoeError(
                f"the plan has lora_bias experts and an adapted embedding ({path}); PEFT refuses "
                "lora_bias on embeddings, so it cannot be exported as one adapter"
            )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for path, layer in layers:
        coefficients = layer.routing.coefficients
        if coefficients is None:
            raise AtmoeError("no plan yet: run the model on a prompt (or under forced routing) first")
        coefficient = coefficients[0, 0].float()  # [E+1]
        row = coefficient[layer.rank_column] * layer.rank_scale  # [R]
        keep = row != 0  # [R]
        if not bool(keep.any()):
            continue
        A = layer.A_cat.float()[keep]  # [R', k]
        B = layer.B_cat.float()[:, keep] * row[keep]  # [d, R']
        key = path.removeprefix("base_model.")
        prefix = f"base_model.model.{key}"
        if isinstance(layer, MixtureLoraEmbedding):
            tensors[f"{prefix}.lora_embedding_A"] = A.contiguous().cpu()
            tensors[f"{prefix}.lora_embedding_B"] = B.contiguous().cpu()
        else:
            tensors[f"{prefix}.lora_A.weight"] = A.contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = B.contiguous().cpu()
            fan_in_fan_out |= _fan_in_fan_out(layer)
            if lora_bias:
                bias = torch.zeros(layer.out_features)
                if layer.bias_rows is not None:
                    bias = coefficient[layer.bias_column] @ layer.bias_rows.float()  # [d]
                tensors[f"{prefix}.lora_B.bias"] = bias.contiguous().cpu()
        ranks[key] = int(A.shape[0])
    if not tensors:
        raise AtmoeError("the plan gives every expert weight 0: nothing to export")
    return tensors, ranks, fan_in_fan_out, lora_bias


def export_lora(
    model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the current plan of ``model`` as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    tensors, ranks, fan_in_fan_out, lora_bias = plan_tensors(model)
    r = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(model.config, "_name_or_path", None),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {_escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {_escape(k): v for k, v in ranks.items() if v != r},
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(dtype) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _escape(key: str) -> str:
    return key.replace(".", r"\.")


def _task_type(model) -> str | None:
    name = type(model.base_model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None
