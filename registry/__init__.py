"""The catalog: SQLAlchemy models, content-addressed blob store, expert/composition/router services.

``from atmoe.registry import Registry``; the names below are imported on first use, so that
``import atmoe.registry`` stays cheap and never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Registry": "atmoe.registry.registry",
    "BlobStore": "atmoe.registry.store",
    "Settings": "atmoe.registry.config",
    "Ref": "atmoe.registry.names",
    "parse_ref": "atmoe.registry.names",
    "validate_name": "atmoe.registry.names",
    "AdapterInfo": "atmoe.registry.validate",
    "validate_adapter": "atmoe.registry.validate",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'atmoe.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
