"""Output helpers: data on stdout (``print_json``, ``print_json_rows``, ``print_table``), messages on
stderr.

rich is imported on first use, and only for a terminal (tables, colour, progress): output that is
piped or redirected is plain text, so that ``atmoe-reg list | ...`` does not pay for importing it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import Any

import click

PLAIN_TABLE_ROWS = 1000  # above this, tables are printed as aligned plain text (rich is too slow)
DIGEST_CHARS = 12
PIPED_PAGE_ROWS = 50  # a listing's default page when stdout is not a terminal
JSON_CHUNK_ROWS = 1000  # lines per write of a long JSON listing


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by null: --json is always valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_finite(item) for item in value]
    if callable(getattr(value, "to_dict", None)):
        return _finite(value.to_dict())
    return value


_encode_compact = json.JSONEncoder(default=_json_default, ensure_ascii=False, allow_nan=False).encode


def _json_line(item: Any) -> str:
    try:
        return _encode_compact(item)
    except ValueError:  # a non-finite float somewhere in this item
        return _encode_compact(_finite(item))


def print_json(data: Any) -> None:
    """The data alone on stdout, as JSON (for --json); never NaN or Infinity, which JSON lacks.

    Indented for people; a long list is written compactly, one item per line, because the
    indenting encoder is pure Python and 100,000 experts must list in well under a second.
    """
    if isinstance(data, list) and len(data) > PLAIN_TABLE_ROWS:
        print_json_rows(data)
        return
    try:
        text = json.dumps(data, indent=2, default=_json_default, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite float somewhere: the rare case pays for the walk
        text = json.dumps(_finite(data), indent=2, default=_json_default, ensure_ascii=False, allow_nan=False)
    click.echo(text)


def print_json_rows(rows: Iterable[Any]) -> None:
    """A JSON array of ``rows`` on stdout, written while they come: the text of ``print_json(list(rows))``
    (indented up to ``PLAIN_TABLE_ROWS`` items, one compact item per line beyond), without waiting
    for, or holding, the whole of a long listing."""
    items = iter(rows)
    head = list(islice(items, PLAIN_TABLE_ROWS + 1))
    if len(head) <= PLAIN_TABLE_ROWS:
        print_json(head)
        return
    write = sys.stdout.write
    write("[\n")
    lines = chain(head, items)
    write(",\n".join(_json_line(item) for item in islice(lines, JSON_CHUNK_ROWS)))
    while chunk := [_json_line(item) for item in islice(lines, JSON_CHUNK_ROWS)]:
        write(",\n" + ",\n".join(chunk))
    write("\n]\n")


def screen_rows() -> int:
    """A listing's default page: one screen on a terminal (its height, less the header, the note
    under the table and the prompt), else ``PIPED_PAGE_ROWS``."""
    if not sys.stdout.isatty():
        return PIPED_PAGE_ROWS
    return max(10, shutil.get_terminal_size().lines - 3)


def _width() -> int | None:
    # Piped output would otherwise be cut at 80 columns; let COLUMNS win when set.
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


@lru_cache(maxsize=1)
def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def console() -> Any:
    """The rich Console for messages and progress (stderr)."""
    return _stderr_console()


def stdout_console() -> Any:
    """A rich Console on the current stdout (not cached: tests swap stdout)."""
    from rich.console import Console

    return Console(file=sys.stdout, width=_width(), highlight=False, soft_wrap=False)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """Catalog text made safe for a terminal: control characters (ESC and OSC sequences, BEL, C1
    codes...) shown as ``\\xNN`` instead of being sent; tabs and newlines kept. Data reaches the
    screen only through this, and as rich ``Text``, never as markup: a tag ``[/bold]`` is text."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def message(text: str, *, style: str | None = None) -> None:
    """A one-line message on stderr (rich markup is not interpreted, control characters escaped);
    rich only for a ``style`` (colour), plain text needs no console."""
    if style is None:
        click.echo(plain(text), err=True)
        return
    console().print(plain(text), style=style, markup=False, highlight=False, soft_wrap=True)


def warn(text: str) -> None:
    console().print(f"Warning: {plain(text)}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    """A table on stdout: rich on a terminal, aligned plain text when piped (the same columns, one
    line per row) or for very long listings. Cells are text, never markup, with control characters
    escaped (``plain``)."""
    text_rows = [[plain(v if type(v) is str else cell(v)) for v in row] for row in rows]
    if len(text_rows) > PLAIN_TABLE_ROWS or not sys.stdout.isatty():
        widths = [max([len(c), *(len(r[i]) for r in text_rows)]) for i, c in enumerate(columns)]
        lines = [plain(title)] if title else []
        lines.append("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
        lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in text_rows)
        sys.stdout.write("\n".join(lines) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(plain(title)) if title else None, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column.upper(), overflow="fold")
    for row in text_rows:
        table.add_row(*(Text(v) for v in row))
    stdout_console().print(table)


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Key / value lines on stdout (``show``)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in fields:
        table.add_row(Text(plain(key)), Text(plain(cell(value))))
    stdout_console().print(table)


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def metric(value: float | None) -> str:
    """A metric for a table cell: four decimals, empty when absent."""
    return "" if value is None else f"{value:.4f}"


def short_digest(digest: str | None) -> str:
    return (digest or "")[:DIGEST_CHARS]
