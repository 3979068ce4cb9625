"""The demo's console, and a counting wrapper over the toolkit's progress bar for its long steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console

from atmoe.training import progress_bar as toolkit_progress_bar

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``; fields (e.g. loss) are shown next to the bar."""
    with toolkit_progress_bar(console) as progress:
        task = progress.add_task(label, total=total, stats="")

        def advance(**fields: float) -> None:
            stats = " ".join(f"{k}={v:.3f}" for k, v in fields.items())
            progress.update(task, advance=1, stats=stats)

        yield advance
