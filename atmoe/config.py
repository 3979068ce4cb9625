"""The settings of a composition (``AtmoeConfig``) and of a router training run (``TrainConfig``):
the one definition of each option. Torch-free, so the CLI can derive its options from them.

Each field carries its command-line ``flag`` and ``help`` (and ``choices``) in its metadata; the
CLI's options are made from them (``atmoe.cli.options``), and ``__post_init__`` raises
``UsageError`` naming the flag. A composition stores its config in the catalog and in archives as
``to_columns()`` (``from_columns`` reads it back).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atmoe.errors import UsageError

ROUTING_MODES = ("sequence", "token")
ROUTER_KINDS = ("grouped", "flat")
SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
ROUTER_INITS = ("zero", "prompts")
DEFAULT_LAMBDA_WITH_GENERAL = 0.5


def option(flag: str | None, help: str, *, choices: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    """A dataclass field that is a command-line option ``flag`` (None: not on the command line)."""
    metadata: dict[str, Any] = {"flag": flag, "help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(metadata=metadata, **kwargs)


@dataclass
class AtmoeConfig:
    """How the experts of a composition are mixed (DESIGN.md section 2).

    ``lam`` resolves in ``__post_init__``, the one place of that rule: without a general expert it
    must be 1.0 (None means 1.0); with one, None means 0.5, an even split between the routed
    experts and the general expert. After construction ``lam`` is always a float.
    """

    lam: float | None = option(
        "--lambda",
        "Weight of the routed experts; the general expert gets 1 - lambda. Default 0.5 with a general "
        "expert, 1.0 (and nothing else allowed) without one.",
        default=None,
    )
    learn_lambda: bool = option(
        "--learn-lambda",
        "Learn one lambda per block (sigmoid of a parameter started at logit(lambda)); needs a general expert.",
        default=False,
    )
    temperature: float = option(
        "--temperature",
        "Softmax temperature tau of both routing stages; small is sharp, large is even.",
        default=1.0,
    )
    routing: str = option(
        "--routing",
        "'sequence': one weight table per request and block, from the prompt's mean hidden state (decoding "
        "reuses it); 'token': weights per token.",
        choices=ROUTING_MODES,
        default="sequence",
    )
    router: str = option(
        "--router",
        "'grouped': the AT-MoE two-stage softmax; 'flat': one softmax over all experts (an ablation).",
        choices=ROUTER_KINDS,
        default="grouped",
    )
    shared_router: bool = option(
        "--shared-router", "One router shared by all blocks instead of one per block (an ablation).", default=False
    )
    static_inside: bool = option(
        "--static-inside",
        "Inside-group weights from a learned table instead of a function of the input (an ablation; grouped "
        "router only).",
        default=False,
    )
    general: bool = option(
        None,
        "Whether the composition has a pre-merged general expert (set from --general / general=).",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise UsageError(f"--routing must be one of {', '.join(ROUTING_MODES)}, not {self.routing!r}")
        if self.router not in ROUTER_KINDS:
            raise UsageError(f"--router must be one of {', '.join(ROUTER_KINDS)}, not {self.router!r}")
        if self.static_inside and self.router != "grouped":
            raise UsageError("--static-inside only applies to --router grouped")
        for flag, value in (
            ("--learn-lambda", self.learn_lambda),
            ("--shared-router", self.shared_router),
            ("--static-inside", self.static_inside),
            ("general", self.general),
        ):
            if not isinstance(value, bool):
                raise UsageError(f"{flag} must be true or false, not {value!r}")
        self.temperature = check_temperature(self.temperature)
        if self.lam is None:
            self.lam = DEFAULT_LAMBDA_WITH_GENERAL if self.general else 1.0
        if (
            isinstance(self.lam, bool)
            or not isinstance(self.lam, (int, float))
            or not math.isfinite(self.lam)
            or not 0.0 <= self.lam <= 1.0
        ):
            raise UsageError(f"--lambda must be a number between 0 and 1, not {self.lam!r}")
        self.lam = float(self.lam)
        if not self.general and self.lam != 1.0:
            raise UsageError("--lambda below 1 needs a --general expert to blend with; without one lambda is 1")
        if self.learn_lambda and not self.general:
            raise UsageError("--learn-lambda needs a general expert (--general)")
        if self.learn_lambda and not 0.0 < self.lam < 1.0:
            raise UsageError("--learn-lambda needs --lambda strictly between 0 and 1 to start from")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AtmoeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_columns(self) -> dict[str, Any]:
        """The stored form (catalog columns, archive manifests, the spec digest): lam, learn_lambda,
        temperature, routing, and the router options."""
        return {
            "lam": self.lam,
            "learn_lambda": self.learn_lambda,
            "temperature": self.temperature,
            "routing": self.routing,
            "options": {
                "router": self.router,
                "shared_router": self.shared_router,
                "static_inside": self.static_inside,
            },
        }

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any], *, general: bool) -> AtmoeConfig:
        """Read ``to_columns()`` back (missing router options take their defaults); ``UsageError``
        for values no composition can have."""
        options = columns.get("options") or {}
        if not isinstance(options, Mapping):
            raise UsageError(f"options must be an object, not {options!r}")
        unknown = sorted(set(options) - {"router", "shared_router", "static_inside"})
        if unknown:
            raise UsageError(f"unknown composition option {unknown[0]!r}")
        return cls(
            lam=columns.get("lam"),
            learn_lambda=columns.get("learn_lambda", False),
            temperature=columns.get("temperature", 1.0),
            routing=columns.get("routing", "sequence"),
            general=general,
            **options,
        )


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


@dataclass
class TrainConfig:
    """Hyperparameters of a router training run; recorded with the router."""

    epochs: int = option("--epochs", "Passes over the training data.", default=3)
    lr: float = option("--lr", "AdamW learning rate of the routers.", default=5e-3)
    batch_size: int = option("--batch-size", "Examples per step before accumulation.", default=8)
    max_length: int = option("--max-length", "Tokens per example, the prompt cut on the left.", default=512)
    grad_accum: int = option("--grad-accum", "Micro-batches per optimizer step.", default=1)
    seed: int = option("--seed", "Seed of the shuffle and of torch.", default=0)
    device: str | None = option("--device", "cpu, cuda, mps (default: accelerate's choice).", default=None)
    mixed_precision: str = option(
        "--mixed-precision", "Mixed precision of the forward passes.", choices=MIXED_PRECISIONS, default="no"
    )
    routing_loss_weight: float = option(
        "--routing-loss-weight", "Weight of the auxiliary routing loss on examples with intents.", default=0.5
    )
    weight_decay: float = option("--weight-decay", "AdamW weight decay.", default=0.0)
    max_grad_norm: float = option("--max-grad-norm", "Gradient clipping norm; 0 disables it.", default=1.0)
    schedule: str = option(
        "--schedule",
        "Learning-rate schedule after the warm-up: cosine or linear decay to 0, or constant.",
        choices=SCHEDULES,
        default="cosine",
    )
    warmup_ratio: float = option(
        "--warmup-ratio", "Share of the optimizer steps spent warming the learning rate up from 0.", default=0.05
    )
    init: str = option(
        "--init",
        "Router start: zero (even weights) or prompts (each expert's example prompts, the examples whose "
        "intents name it, as mergekit-moe's hidden gates).",
        choices=ROUTER_INITS,
        default="zero",
    )

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.max_length >= 2, "--max-length must be at least 2"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.routing_loss_weight >= 0, "--routing-loss-weight must be >= 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (self.mixed_precision in MIXED_PRECISIONS, "--mixed-precision must be no, fp16 or bf16"),
            (self.schedule in SCHEDULES, "--schedule must be " + ", ".join(SCHEDULES)),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be >= 0 and < 1"),
            (self.init in ROUTER_INITS, "--init must be " + " or ".join(ROUTER_INITS)),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
