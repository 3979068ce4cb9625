"""AT-MoE: grouped, layer-wise routed mixtures of frozen LoRA experts (arXiv 2410.10896).

The heavy names (``build_atmoe`` and friends) are imported lazily, so that ``atmoe.registry`` and
``atmoe.cli`` can be imported without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_atmoe": "atmoe.builder",
    "AtMoEModel": "atmoe.model",
    "LoraAdapter": "atmoe.adapters",
    "load_adapter": "atmoe.adapters",
    "freeze_all_but_routers": "atmoe.freeze",
    "router_parameters": "atmoe.freeze",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'atmoe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
