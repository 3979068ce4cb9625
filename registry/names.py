"""Names of experts, groups, compositions and aliases, and references ``NAME[@VERSION][:ROUTER]``.

VERSION is a number, ``latest``, or (for experts) an alias such as ``stable`` (``expert_aliases.py``);
ROUTER is a number or a router alias. An alias is never all digits nor ``latest``: it would shadow
a number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from atmoe.errors import InvalidName, UsageError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LATEST = "latest"


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid catalog name, else raise InvalidName saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} is empty")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidName(f"{what} {name!r} looks like a path: use letters, digits, '.', '_' and '-'")
    if not NAME_PATTERN.match(name):
        if len(name) > 64:
            raise InvalidName(f"{what} {name[:20]!r}... is longer than 64 characters")
        raise InvalidName(
            f"{what} {name!r} is not valid: start with a letter or digit, then use only "
            "letters, digits, '.', '_' and '-' (at most 64 characters)"
        )
    return name


def validate_alias(alias: str, shadows: str = "version") -> str:
    """An alias is a valid name that cannot read as a number or ``latest`` (it would shadow the
    ``shadows`` number of that name); raises InvalidName or UsageError saying so."""
    validate_name(alias, "alias")
    if alias.isdigit() or alias == LATEST:
        raise UsageError(f"alias {alias!r} would read as a {shadows} number: choose a name with a letter, e.g. stable")
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference. ``version`` None means latest (or the version ``alias`` points at: an expert
    alias such as ``gastro@stable``); ``router`` is a number or a router alias."""

    name: str
    version: int | None = None
    router: int | str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        text = self.name
        if self.alias is not None:
            text = f"{self.name}@{self.alias}"
        elif self.version is not None:
            text = f"{self.name}@{self.version}"
        return text if self.router is None else f"{text}:{self.router}"


def _positive_int(text: str, what: str, ref: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"reference {ref!r}: {what} must be a number >= 1 or 'latest', not {text!r}")
    return int(text)


def parse_ref(text: str) -> Ref:
    """Parse ``NAME[@VERSION][:ROUTER]``: VERSION a number, ``latest`` or an alias, ROUTER a number or
    an alias."""
    if not isinstance(text, str) or not text:
        raise UsageError("empty reference: expected NAME[@VERSION][:ROUTER]")
    rest, sep, router_text = text.partition(":")
    if sep and not router_text:
        raise UsageError(f"reference {text!r}: nothing after ':' (expected a router number or alias)")
    name, at, version_text = rest.partition("@")
    if at and not version_text:
        raise UsageError(f"reference {text!r}: nothing after '@' (expected a version or 'latest')")
    validate_name(name)
    version = None
    alias = None
    if at and version_text != LATEST:
        if not NAME_PATTERN.match(version_text):
            raise UsageError(
                f"reference {text!r}: version must be a number >= 1, 'latest' or an alias, not {version_text!r}"
            )
        if version_text.isdigit():
            version = _positive_int(version_text, "version", text)
        else:
            alias = version_text
    router: int | str | None = None
    if sep:
        if router_text.isdigit():
            router = _positive_int(router_text, "router", text)
        else:
            router = validate_name(router_text, "router alias")
    return Ref(name=name, version=version, router=router, alias=alias)


def canonical_base_model(reference: str | None) -> str | None:
    """A base-model reference as the catalog keeps it: a relative path that exists here becomes
    absolute (PEFT records the path the model was loaded from, relative to that process's cwd),
    so that building later, from any directory, finds the same model; hub ids stay as they are, and
    ``hf://ORG/REPO[@REV]`` is kept as ``ORG/REPO`` (what PEFT records; the revision is a column of
    its own, ``experts.base_model_columns``), so that one model has one name in the catalog."""
    if not reference:
        return reference
    from atmoe.hub import is_hub_source, parse_hub_ref

    if is_hub_source(reference):
        return parse_hub_ref(reference, subfolder=False).repo_id
    path = Path(reference).expanduser()
    if not path.is_absolute() and path.exists():
        return str(path.resolve())
    return reference
