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

``rank=K`` caps every module at rank K (vLLM's default ``max_lora_rank`` is 16): a module whose plan
has more rank rows is replaced by the truncated SVD of its merged update B A, which is the best
rank-K approximation in the Frobenius norm (Eckart-Young). It is computed without forming the
[d, k] product: with A.T = Q_a R_a and B = Q_b R_b, B A = Q_b (R_b R_a.T) Q_a.T, so only the small
[R, R] core is decomposed. Each module's relative error ||B A - B_K A_K|| / ||B A|| is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atmoe.errors import AtmoeError, RoutingError, UsageError
from atmoe.layer import MixtureLoraEmbedding, MixtureLoraLinear


def _fan_in_fan_out(layer: MixtureLoraLinear) -> bool:
    return not isinstance(layer.base_layer, torch.nn.Linear)


@dataclass
class ExportedPlan:
    """Where a plan was written, and per module the relative error of the rank cap (0 when exact)."""

    path: Path
    rank: int | None
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors of B A (A [R, k], B [d, R], float) and the relative error.

    Returns (A_K [K, k], B_K [d, K], ||B A - B_K A_K||_F / ||B A||_F); exact (error 0) when R <= rank.
    """
    if A.shape[0] <= rank:
        return A, B, 0.0
    q_a, r_a = torch.linalg.qr(A.T.double())  # A.T [k, R] = Q_a [k, R] R_a [R, R]
    q_b, r_b = torch.linalg.qr(B.double())  # B [d, R] = Q_b [d, R] R_b [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the [R, R] core of B A = Q_b core Q_a.T
    b_k = (q_b @ u[:, :rank]) * s[:rank]  # [d, K]
    a_k = (q_a @ vh[:rank].T).T  # [K, k]
    total = float((s * s).sum())
    error = (float((s[rank:] * s[rank:]).sum()) / total) ** 0.5 if total > 0 else 0.0
    return a_k.to(A.dtype).contiguous(), b_k.to(B.dtype).contiguous(), error


def plan_tensors(
    model, rank: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int], bool, bool, dict[str, float]]:
    """The LoRA tensors of the current plan (after a forward): PEFT keys, per-module ranks,
    fan_in_fan_out, lora_bias, and per module the relative error of the ``rank`` cap (``truncate``).

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
    errors: dict[str, float] = {}
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
        if rank is not None:
            A, B, errors[key] = truncate(A, B, rank)  # [K, k], [d, K]
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
    return tensors, ranks, fan_in_fan_out, lora_bias, errors


def export_lora(
    model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the current plan of ``model`` as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    return export_plan(model, out_dir, base_model_name_or_path=base_model_name_or_path, dtype=dtype).path


def export_plan(
    model,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExportedPlan:
    """``export_lora``, optionally capped at ``rank`` per module; returns the path and the errors."""
    from safetensors.torch import save_file

    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank must be a positive integer, not {rank!r}")
    tensors, ranks, fan_in_fan_out, lora_bias, errors = plan_tensors(model, rank)
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
    return ExportedPlan(path=out, rank=rank, errors=errors)


def _escape(key: str) -> str:
    return key.replace(".", r"\.")


def _task_type(model) -> str | None:
    name = type(model.base_model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None
