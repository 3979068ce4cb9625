"""Frozen LoRA experts in memory: a PEFT LoRA directory (safetensors only) read as tensors.

The format (file names, the key grammar, which config fields decide the math, the scaling rules)
is ``atmoe.adapter_format``'s, the same definition that ``add-expert`` validates with; this module
adds the tensors and the NaN / Inf check. Pickle files are refused and never opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atmoe.adapter_format import (
    CONFIG_FILE,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    LoraSettings,
    ModuleLayout,
    module_layouts,
    parse_key,
    read_settings,
)
from atmoe.errors import InvalidAdapter, PickleRefused
from atmoe.jsontext import JsonTextError, parse_json


def module_scaling(config: dict[str, Any], module_key: str) -> tuple[int, float]:
    """(r, s) of one adapted module, as PEFT resolves them (see ``LoraSettings.module_scaling``)."""
    return read_settings(config).module_scaling(module_key)


@dataclass
class LoraAdapter:
    """One LoRA adapter in memory: its PEFT config and its tensors under PEFT's state-dict names.

    ``tensors`` maps ``base_model.model.<module>.lora_A.weight`` to [r, in], ``...lora_B.weight`` to
    [out, r], and the other parts of ``atmoe.adapter_format`` (``lora_B.bias``,
    ``lora_magnitude_vector``, ``lora_embedding_A/B``, a saved ``base_layer.weight``) likewise.
    ``name`` is the expert's name in a composition (None until it has one). Anything that
    ``add-expert`` would refuse raises ``InvalidAdapter`` here too, with the same message.
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    name: str | None = None
    settings: LoraSettings = field(init=False, repr=False, compare=False)
    modules: dict[str, ModuleLayout] = field(init=False, repr=False, compare=False)
    _parts: dict[str, dict[str, Tensor]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = self.name or "adapter"
        try:
            self.settings = read_settings(self.config)
            self.modules = module_layouts(self.settings, {k: tuple(v.shape) for k, v in self.tensors.items()})
        except InvalidAdapter as error:
            raise InvalidAdapter(f"{label}: {error}") from None
        parts: dict[str, dict[str, Tensor]] = {}
        for key, tensor in self.tensors.items():
            parsed = parse_key(key)
            if not tensor.is_floating_point():
                raise InvalidAdapter(f"{label}: tensor {key!r} is {tensor.dtype}; LoRA weights must be floats")
            if not torch.isfinite(tensor).all():
                raise InvalidAdapter(f"{label}: {parsed.module} has NaN or Inf weights ({key})")
            parts.setdefault(parsed.module, {})[parsed.part] = tensor
        self._parts = parts

    @property
    def module_keys(self) -> list[str]:
        """Paths (in the base model) of the modules this adapter adapts, sorted."""
        return sorted(self.modules)

    def lora_pair(self, module_key: str) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of one module; for an embedding (lora_embedding_A [r, vocab],
        lora_embedding_B [dim, r])."""
        parts = self._parts[module_key]
        if self.modules[module_key].kind == "embedding":
            return parts["embedding_A"], parts["embedding_B"]
        return parts["A"], parts["B"]

    def part(self, module_key: str, part: str) -> Tensor | None:
        """A module's optional tensor: "B_bias" [out], "magnitude" [out] (DoRA's m) or "base_weight"."""
        return self._parts[module_key].get(part)

    def scaling(self, module_key: str) -> tuple[int, float]:
        """(r, s) of one module; see ``LoraSettings.module_scaling``."""
        return self.settings.module_scaling(module_key)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Pickle weights (.bin/.pt/.pth/.ckpt) are refused with ``PickleRefused`` and never opened;
    anything else that is not a LoRA adapter raises ``InvalidAdapter``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(f"{path}: pickle weights are never loaded; {PICKLE_HINT}")
    if not path.is_dir():
        raise InvalidAdapter(f"{path}: not a PEFT adapter directory")
    label = name or path.name
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise PickleRefused(f"{path}: {pickles[0]} is a pickle, never loaded; {PICKLE_HINT}")
        raise InvalidAdapter(f"{path}: no {WEIGHTS_FILE}")
    if not config_file.is_file():
        raise InvalidAdapter(f"{path}: no {CONFIG_FILE}")
    try:
        config = parse_json(config_file.read_bytes())
    except JsonTextError as exc:
        raise InvalidAdapter(f"{path}: {CONFIG_FILE}: is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path}: {CONFIG_FILE} is not a JSON object")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{path}: {WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
    return LoraAdapter(config=config, tensors=tensors, name=label)


def save_adapter(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (``adapter_config.json`` + safetensors) and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True), encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def adapter_from_bytes(config_bytes: bytes, weights_bytes: bytes, name: str | None = None) -> LoraAdapter:
    """An adapter from the bytes of its two files (the registry's verified blobs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    label = name or "adapter"
    try:
        config = parse_json(config_bytes)
    except JsonTextError as exc:
        raise InvalidAdapter(f"{label}: {CONFIG_FILE}: is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{label}: {CONFIG_FILE} is not a JSON object")
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{label}: {WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
    return LoraAdapter(config=config, tensors=tensors, name=name)
