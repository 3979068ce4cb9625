"""Options shared by the commands, and options derived from the library's config dataclasses.

``dataclass_options(AtmoeConfig)`` makes one click option per field that has a ``flag`` in its
metadata (``atmoe.config.option``): the flag, help text, default, type and choices all come from
the field, so an option, its default and its check live in one place. The command receives the
fields as keyword arguments under their field names; ``pop_config`` builds the dataclass from them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print data alone on stdout, as JSON.")


def _click_type(hint: Any) -> Any:
    """The click type of a field's annotation (``float | None`` -> float)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {bool: bool, int: int, float: float, str: str}[base]


def dataclass_options(cls: type, *, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding the options of ``cls``'s flagged fields (in field order) to a command."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for spec in reversed(dataclasses.fields(cls)):
            flag = spec.metadata.get("flag")
            if not flag or spec.name in skip:
                continue
            default = spec.default if spec.default is not dataclasses.MISSING else None
            kind = _click_type(hints[spec.name])
            if kind is bool:
                command = click.option(flag, spec.name, is_flag=True, default=default, help=spec.metadata["help"])(
                    command
                )
                continue
            choices = spec.metadata.get("choices")
            command = click.option(
                flag,
                spec.name,
                type=click.Choice(choices) if choices else kind,
                default=default,
                show_default=default is not None,
                help=spec.metadata["help"],
            )(command)
        return command

    return decorate


def pop_config(cls: type[T], kwargs: dict[str, Any], **fixed: Any) -> T:
    """Build ``cls`` from (and remove from ``kwargs``) the options ``dataclass_options`` added;
    ``fixed`` sets the fields that are not options (``general=...``)."""
    assert dataclasses.is_dataclass(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("flag") and f.name in kwargs]
    return cls(**{name: kwargs.pop(name) for name in names}, **fixed)
