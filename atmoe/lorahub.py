"""LoraHub (Huang et al., 2023, arXiv 2307.13269): a gradient-free search of one static weight per expert on
a few examples, as a router kind.

LoraHub searches the coefficients of an element-wise merge of the LoRA modules with nevergrad's
gradient-free optimiser, minimising the loss on 5 to 50 examples plus an L1 penalty. Here the
coefficients are the mixture's routing weights, so they must form the composition's distribution
(sum 1 in all, every group's share summing to its total, DESIGN.md section 3): the search runs over
logits z (bounded to [-BOUND, BOUND]) and the weights are softmax(z). The L1 penalty is on z: it pulls
the search towards the uniform router (z = 0), the regularisation LoraHub's L1 on its coefficients
gives on so few examples. The search starts at z = 0, so the recorded weights never score worse than
the uniform router on the objective. nevergrad's NGOpt, seeded; the same examples, budget, penalty and
seed give the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from atmoe.data import Example
from atmoe.errors import AtmoeError, UsageError

BOUND = 4.0
MIN_EXAMPLES, MAX_EXAMPLES = 5, 50


@dataclass
class SearchResult:
    weights: dict[str, float]  # per expert, sum 1
    objective: float  # loss + penalty of those weights
    loss: float
    uniform_objective: float
    uniform_loss: float
    evaluations: int
    history: list[float] = field(default_factory=list)  # best objective after each evaluation


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def search_weights(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 512,
) -> SearchResult:
    """The static weights minimising response loss + ``l1`` * mean |z| on ``examples``; leaves the model's
    routers set to them."""
    try:
        import nevergrad as ng
    except ImportError:
        raise AtmoeError("--kind lorahub needs nevergrad: pip install 'atmoe-registry[lorahub]'") from None
    import numpy as np

    from atmoe.static_routing import set_static_weights
    from atmoe.training import evaluate

    if not MIN_EXAMPLES <= len(examples) <= MAX_EXAMPLES:
        raise UsageError(
            f"--kind lorahub searches on {MIN_EXAMPLES} to {MAX_EXAMPLES} examples (LoraHub's few-shot setting), "
            f"not {len(examples)}"
        )
    if not isinstance(budget, int) or not 1 <= budget <= 10_000:
        raise UsageError(f"--budget must be an integer between 1 and 10000, not {budget!r}")
    if not (isinstance(l1, int | float) and math.isfinite(l1) and l1 >= 0):
        raise UsageError(f"--l1 must be a finite number >= 0, not {l1!r}")
    names = list(model.expert_names)

    def measure(z: Sequence[float]) -> tuple[float, float]:
        set_static_weights(model, dict(zip(names, _softmax(z))))
        loss = evaluate(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)["loss"]
        return loss + l1 * sum(abs(v) for v in z) / len(z), loss

    uniform_objective, uniform_loss = measure([0.0] * len(names))
    best = ([0.0] * len(names), uniform_objective, uniform_loss)
    history = [uniform_objective]
    parametrization = ng.p.Array(init=np.zeros(len(names))).set_bounds(-BOUND, BOUND)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    for _ in range(budget):
        candidate = optimizer.ask()
        z = [float(v) for v in candidate.value]
        objective, loss = measure(z)
        if not math.isfinite(objective):
            objective = float("inf")
        optimizer.tell(candidate, objective)
        if objective < best[1]:
            best = (z, objective, loss)
        history.append(best[1])
    weights = dict(zip(names, _softmax(best[0])))
    set_static_weights(model, weights)
    return SearchResult(
        weights=weights,
        objective=best[1],
        loss=best[2],
        uniform_objective=uniform_objective,
        uniform_loss=uniform_loss,
        evaluations=budget + 1,
        history=history,
    )
