"""Names and references: property tests of validate_name and parse_ref."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atmoe.errors import InvalidName, UsageError
from atmoe.registry.names import NAME_PATTERN, Ref, parse_ref, validate_alias, validate_name

valid_names = st.from_regex(NAME_PATTERN, fullmatch=True)
aliases = valid_names.filter(lambda s: not s.isdigit() and s != "latest")


@given(valid_names)
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@given(st.text(max_size=20), st.sampled_from(["/", "\\"]), st.text(max_size=20))
def test_names_with_separators_look_like_paths(prefix: str, separator: str, suffix: str) -> None:
    with pytest.raises(InvalidName, match="looks like a path"):
        validate_name(prefix + separator + suffix)


@pytest.mark.parametrize("name", [".", "..", "../etc", "a/b", "C:\\x", "/abs"])
def test_path_like_names(name: str) -> None:
    with pytest.raises(InvalidName, match="looks like a path"):
        validate_name(name)


@given(st.text(max_size=80))
def test_every_string_is_either_valid_or_refused_in_one_line(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName as error:
        assert "\n" not in str(error).replace(repr(name), "")
        assert not NAME_PATTERN.match(name) or name in (".", "..")
    else:
        assert NAME_PATTERN.match(name) and len(name) <= 64


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a b", "x" * 65, "ü", "a:b", "a@b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@given(valid_names, st.one_of(st.none(), st.integers(1, 10**6)), st.one_of(st.none(), st.integers(1, 10**6), aliases))
def test_ref_round_trip(name: str, version: int | None, router: int | str | None) -> None:
    ref = Ref(name, version, router)
    assert parse_ref(str(ref)) == ref


@given(valid_names, aliases, st.one_of(st.none(), st.integers(1, 10**6), aliases))
def test_version_alias_round_trip(name: str, alias: str, router: int | str | None) -> None:
    ref = Ref(name, None, router, alias=alias)
    assert parse_ref(str(ref)) == ref
    assert validate_alias(alias) == alias


@given(st.one_of(st.integers(0, 10**6).map(str), st.just("latest")))
def test_aliases_never_shadow_a_version(alias: str) -> None:
    with pytest.raises(UsageError, match="would read as a version number"):
        validate_alias(alias)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gastro", Ref("gastro")),
        ("gastro@3", Ref("gastro", 3)),
        ("gastro@latest", Ref("gastro", None)),
        ("med@2:prod", Ref("med", 2, "prod")),
        ("med:4", Ref("med", None, 4)),
        ("med@latest:prod", Ref("med", None, "prod")),
        ("gastro@stable", Ref("gastro", alias="stable")),
        ("gastro@2024q1", Ref("gastro", alias="2024q1")),
        ("med@stable:prod", Ref("med", None, "prod", alias="stable")),
    ],
)
def test_parse_ref(text: str, expected: Ref) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize(
    "text", ["", "a@", "a@0", "a@-1", "a@.x", "a@x/y", "a@\u00b2", "a:", "a@1:", "a:../x", "../a@1", "a@1@2"]
)
def test_bad_refs(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(text)
