"""Static merges of a routing plan as baselines (``export-lora --merge ties|dare_linear|svd``), through PEFT's own
``add_weighted_adapter``, and only where PEFT is exact for the adapters at hand.

A merge takes one weight per adapter: each expert's plan coefficient lambda * w_e averaged over the
blocks (and the general expert's 1 - lambda), as the plan routes the prompt (``--prompt``) or as forced
(``--force``). PEFT writes the merged adapter with ``r = lora_alpha = new rank`` and every other
setting copied from the first adapter's config, so it is wrong wherever those settings change the
scaling or the shapes: an rsLoRA adapter (the copy keeps ``use_rslora``: scaling sqrt(r) instead of
1), a ``rank_pattern`` or ``alpha_pattern`` (the copy keeps them for modules of the new rank). Those
are refused in one line before PEFT runs. The ``svd`` merge is then checked against its definition,
the best rank-K approximation of the weighted sum of the updates, module by module: a merge off by
more than ``TOLERANCE`` beyond the truncation's own error is refused and nothing is written. ``ties``
and ``dare_linear`` are heuristics with no exact reference (dare drops entries at random: seeded
here); they are what PEFT computes.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atmoe.errors import AtmoeError, UsageError

METHODS = ("ties", "dare_linear", "svd")
TOLERANCE = 1e-4


@dataclass
class MergeReport:
    path: Path
    method: str
    weights: dict[str, float]
    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # svd: per module, relative to the exact sum


def plan_weights(model) -> dict[str, float]:
    """Each adapter's coefficient in the current plan (after a forward), averaged over the blocks:
    lambda * w_e per expert, 1 - lambda for the general expert (row 0 of the batch)."""
    rows = [r.coefficients[0].float().mean(0) for r in model._routings if r.coefficients is not None]
    if not rows:
        raise AtmoeError("no plan yet: run the model on a prompt (or under forced routing) first")
    mean = torch.stack(rows).mean(0)  # [E + 1]
    weights = {name: float(mean[i]) for i, name in enumerate(model.expert_names)}
    weights["__general__"] = float(mean[-1])
    return weights


def _refuse_inexact(configs: Mapping[str, dict]) -> None:
    for name, config in configs.items():
        if config.get("use_rslora"):
            raise UsageError(
                f"{name} is an rsLoRA adapter: PEFT's add_weighted_adapter copies use_rslora onto the merged "
                "adapter (scaling sqrt(r) instead of 1), so the merge would be wrong; export the exact plan instead"
            )
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise UsageError(
                f"{name} has a rank_pattern or alpha_pattern: PEFT's add_weighted_adapter copies them onto the "
                "merged adapter, so the merge would be wrong; export the exact plan instead"
            )


def merge_adapters(
    base,
    folders: Mapping[str, Path],
    weights: Mapping[str, float],
    out_dir: str | Path,
    *,
    method: str,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
) -> MergeReport:
    """Merge the adapters in ``folders`` ({name: adapter dir}) with ``weights`` by ``method`` on a copy of
    ``base`` (PEFT's add_weighted_adapter) and write the merged adapter to ``out_dir``."""
    from peft import PeftModel

    if method not in METHODS:
        raise UsageError(f"--merge must be one of {', '.join(METHODS)}, not {method!r}")
    if not 0 < density <= 1:
        raise UsageError(f"--density must be in (0, 1], not {density}")
    used = {name: w for name, w in weights.items() if w > 0 and name in folders}
    if not used:
        raise AtmoeError("the plan gives every expert weight 0: nothing to merge")
    configs = {name: json.loads((Path(folders[name]) / "adapter_config.json").read_text()) for name in used}
    _refuse_inexact(configs)
    names = list(used)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    options: dict = {"combination_type": method}
    if method == "svd":
        options["svd_rank"] = rank
    else:
        options["density"] = density
        if rank is not None:
            raise UsageError("--rank goes with --merge svd (ties and dare_linear keep the adapters' common rank)")
    torch.manual_seed(seed)  # dare's random drops
    try:
        model.add_weighted_adapter(names, [used[n] for n in names], "merged", **options)
    except ValueError as error:  # PEFT's own refusals: ranks that differ for ties / dare_linear, ...
        raise UsageError(f"--merge {method}: {' '.join(str(error).split())}") from None
    errors = _check_svd(model, names, used) if method == "svd" else {}
    worst = max(errors.values(), default=0.0)
    if worst > TOLERANCE:
        module = max(errors, key=errors.get)
        raise AtmoeError(f"PEFT's svd merge is off its definition by {worst:.3g} at {module}; nothing was written")
    out = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent if out.parent.exists() else None))
    try:
        model.save_pretrained(str(staging), selected_adapters=["merged"])
        written = staging / "merged" if (staging / "merged").is_dir() else staging
        out.mkdir(parents=True, exist_ok=True)
        for item in written.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rank_used = int(model.peft_config["merged"].r)
    return MergeReport(path=out, method=method, weights=dict(used), rank=rank_used, errors=errors)


@torch.no_grad()
def _check_svd(model, names: list[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Per module: || merged - best_rank_K(sum_i w_i dW_i) || / || sum_i w_i dW_i ||."""
    from peft.tuners.lora import LoraLayer

    errors: dict[str, float] = {}
    rank = int(model.peft_config["merged"].r)
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "merged" not in module.lora_A:
            continue
        exact = sum(weights[n] * module.get_delta_weight(n).double() for n in names if n in module.lora_A)
        if not isinstance(exact, torch.Tensor):
            continue
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        merged = module.get_delta_weight("merged").double()
        norm = float(exact.norm())
        errors[path] = float((merged - best).norm()) / norm if norm > 0 else 0.0
    return errors
