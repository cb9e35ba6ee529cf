"""Every spec in experiments/ loads and validates against the live registry."""

from pathlib import Path

import pytest

from d2v.spec.config import load_spec, validate

SPECS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))


def test_there_are_specs():
    names = {p.name for p in SPECS}
    assert {"asr_ls960.yaml", "asr_demo.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_validates(path):
    validate(load_spec(path))
