"""The settings of one AT-MoE composition, as a dataclass whose fields carry their help text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from atmoe.errors import UsageError

ROUTING_MODES = ("sequence", "token")
ROUTER_KINDS = ("grouped", "flat")
DEFAULT_LAMBDA_WITH_GENERAL = 0.5


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AtmoeConfig:
    """How the experts of a composition are mixed (DESIGN.md section 2).

    ``lam`` resolves in ``__post_init__``: without a general expert it must be 1.0 (None means 1.0);
    with one, None means 0.5, an even split between the routed experts and the general expert.
    After construction ``lam`` is always a float. Invalid values raise ``UsageError`` naming the
    command-line flag.
    """

    lam: float | None = _help(
        "--lambda: weight of the routed experts; the general expert gets 1 - lambda. "
        "Default 0.5 with a general expert, 1.0 (and nothing else allowed) without one.",
        default=None,
    )
    learn_lambda: bool = _help(
        "--learn-lambda: learn one lambda per block (sigmoid of a parameter started at logit(lambda)); "
        "needs a general expert.",
        default=False,
    )
    temperature: float = _help(
        "--temperature: softmax temperature tau of both routing stages; small is sharp, large is even.",
        default=1.0,
    )
    routing: str = _help(
        "--routing: 'sequence' (one weight table per request and block, from the prompt's mean hidden "
        "state; decoding reuses it) or 'token' (weights per token).",
        default="sequence",
    )
    router: str = _help(
        "--router: 'grouped' (the AT-MoE two-stage softmax) or 'flat' (one softmax over all experts, "
        "an ablation).",
        default="grouped",
    )
    shared_router: bool = _help(
        "--shared-router: one router shared by all blocks instead of one per block (an ablation).",
        default=False,
    )
    static_inside: bool = _help(
        "--static-inside: inside-group weights from a learned table instead of a function of the input "
        "(an ablation; grouped router only).",
        default=False,
    )
    general: bool = _help(
        "--general: whether the composition has a pre-merged general expert (set by the builder).",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise UsageError(f"--routing must be one of {', '.join(ROUTING_MODES)}, not {self.routing!r}")
        if self.router not in ROUTER_KINDS:
            raise UsageError(f"--router must be one of {', '.join(ROUTER_KINDS)}, not {self.router!r}")
        if self.static_inside and self.router != "grouped":
            raise UsageError("--static-inside only applies to --router grouped")
        check_temperature(self.temperature)
        if self.lam is None:
            self.lam = DEFAULT_LAMBDA_WITH_GENERAL if self.general else 1.0
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
            raise UsageError(f"--lambda must be a number between 0 and 1, not {self.lam!r}")
        self.lam = float(self.lam)
        if not self.general and self.lam != 1.0:
            raise UsageError("--lambda needs a general expert (--general); without one lambda is 1")
        if self.learn_lambda and not self.general:
            raise UsageError("--learn-lambda needs a general expert (--general)")
        if self.learn_lambda and not 0.0 < self.lam < 1.0:
            raise UsageError("--learn-lambda needs --lambda strictly between 0 and 1 to start from")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AtmoeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_temperature(temperature: Any) -> float:
    """A temperature must be a finite number > 0 (``UsageError`` naming --temperature otherwise)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise UsageError(f"--temperature must be a finite number > 0, not {temperature!r}")
    return float(temperature)
