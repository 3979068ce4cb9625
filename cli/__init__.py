"""``atmoe-reg``: the command line (click + rich), a thin layer over ``atmoe.registry`` and ``atmoe``.

Each command module registers its commands on ``main`` when imported; add new ones to the import
below. Modules must not import torch at import time (``atmoe-reg list`` stays fast).
"""

from __future__ import annotations

from atmoe.cli import compositions, db, evaluations, experts, routers, serve, team, transfer  # noqa: E402,F401  (registers the commands)
from atmoe.cli.app import get_registry, main

__all__ = ["get_registry", "main"]
from atmoe.cli import demo  # noqa: E402,F401  (registers the demo command)
