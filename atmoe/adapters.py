"""Frozen LoRA experts: reading a PEFT LoRA directory (safetensors only) and its per-module scaling.

An adapter directory is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight`` ([r, in])
and ``...lora_B.weight`` ([out, r]). PEFT stores them that way for ``nn.Linear`` and for GPT-2's
``Conv1D`` (fan_in_fan_out) alike. Pickle files are refused and never opened.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atmoe.errors import InvalidAdapter, PickleRefused

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# base_model.model.<module>.lora_A.weight, or with an adapter name: ...lora_A.<adapter>.weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")

_CONVERT_HINT = (
    "convert it once, in an environment you trust, with PeftModel.from_pretrained(base, DIR)"
    ".save_pretrained(OUT, safe_serialization=True)"
)


def get_pattern_key(pattern_keys: list[str] | tuple[str, ...], module_key: str) -> str:
    """The first pattern that matches the end of ``module_key`` (exactly as peft.utils.other does).

    A pattern matches when it is the whole key or a suffix after a dot, by ``re.match``; keys are
    tried in the config's order (PEFT writes adapter_config.json with sorted keys, so for a saved
    adapter that is sorted order); no match returns ``module_key`` itself.
    """
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return pattern
    return module_key


def module_scaling(config: dict[str, Any], module_key: str) -> tuple[int, float]:
    """(r, s) of one adapted module, as PEFT 0.21 resolves them (LoraModel._create_and_replace).

    ``module_key`` is the module's path in the base model (``model.layers.0.self_attn.q_proj``).
    r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches, else from
    ``r`` / ``lora_alpha``; s = alpha / sqrt(r) with ``use_rslora``, else alpha / r.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module_key), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module_key), config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(scale)


@dataclass
class LoraAdapter:
    """One LoRA adapter in memory: its PEFT config and its tensors under PEFT's state-dict names.

    ``tensors`` maps ``base_model.model.<module>.lora_A.weight`` to [r, in] and ``...lora_B.weight``
    to [out, r]. ``name`` is the expert's name in a composition (None until it has one).
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    name: str | None = None
    _pairs: dict[str, dict[str, Tensor]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = self.name or "adapter"
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InvalidAdapter(f"{label}: peft_type is {peft_type}, only LORA adapters can be experts")
        for key in ("r", "lora_alpha"):
            if not isinstance(self.config.get(key), (int, float)) or self.config[key] <= 0:
                raise InvalidAdapter(f"{label}: adapter_config.json needs a positive {key!r}")
        for flag in ("use_dora", "lora_bias"):
            if self.config.get(flag):
                raise InvalidAdapter(f"{label}: {flag}=True adapters are not supported (plain LoRA only)")
        if self.config.get("modules_to_save"):
            raise InvalidAdapter(f"{label}: modules_to_save is not supported (an expert may only add LoRA)")
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, tensor in self.tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise InvalidAdapter(f"{label}: tensor {key!r} is not a LoRA A/B weight of a linear layer")
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        if not pairs:
            raise InvalidAdapter(f"{label}: the adapter holds no LoRA weights")
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise InvalidAdapter(f"{label}: module {module} has lora_A or lora_B missing")
            a, b = pair["A"], pair["B"]
            r, _ = module_scaling(self.config, module)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise InvalidAdapter(
                    f"{label}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"but its config gives rank {r}"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise InvalidAdapter(f"{label}: {module} has NaN or Inf weights")
        self._pairs = pairs

    @property
    def module_keys(self) -> list[str]:
        """Paths (in the base model) of the modules this adapter adapts, sorted."""
        return sorted(self._pairs)

    def lora_pair(self, module_key: str) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of one module."""
        pair = self._pairs[module_key]
        return pair["A"], pair["B"]

    def scaling(self, module_key: str) -> tuple[int, float]:
        """(r, s) of one module; see ``module_scaling``."""
        return module_scaling(self.config, module_key)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Pickle weights (.bin/.pt/.pth/.ckpt) are refused with ``PickleRefused`` and never opened;
    anything else that is not a LoRA adapter raises ``InvalidAdapter``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(f"{path}: pickle weights are never loaded; {_CONVERT_HINT}")
    if not path.is_dir():
        raise InvalidAdapter(f"{path}: not a PEFT adapter directory")
    label = name or path.name
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise PickleRefused(f"{path}: {pickles[0]} is a pickle, never loaded; {_CONVERT_HINT}")
        raise InvalidAdapter(f"{path}: no {WEIGHTS_NAME}")
    if not config_file.is_file():
        raise InvalidAdapter(f"{path}: no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{path}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path}: {CONFIG_NAME} is not a JSON object")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{path}: {WEIGHTS_NAME} is corrupt or truncated ({exc})") from None
    return LoraAdapter(config=config, tensors=tensors, name=label)


def save_adapter(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (``adapter_config.json`` + safetensors) and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2, sort_keys=True), encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path
