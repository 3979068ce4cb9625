"""The CLI's composition and training options are derived from the config dataclasses: one
definition of each flag, default, choice list and help text."""

from __future__ import annotations

import dataclasses

import pytest

from atmoe.cli import main
from atmoe.config import AtmoeConfig, TrainConfig


@pytest.mark.parametrize(("command", "cls"), [("compose", AtmoeConfig), ("train-router", TrainConfig)])
def test_every_flagged_field_is_an_option_with_its_default(command, cls):
    params = {p.name: p for p in main.commands[command].params}
    flagged = [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]
    assert flagged
    for spec in flagged:
        param = params[spec.name]
        assert spec.metadata["flag"] in param.opts
        assert param.default == spec.default
        assert param.help == spec.metadata["help"]
        if "choices" in spec.metadata:
            assert tuple(param.type.choices) == spec.metadata["choices"]
    assert "general" not in params or params["general"].opts == ["--general"]  # a reference, not the field
