"""A rich progress bar on stderr for every long step of the demo."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``; fields (e.g. loss) are shown next to the bar."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(label, total=total, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k}={v:.3f}" for k, v in fields.items())
            progress.update(task, advance=1, info=info)

        yield advance
