"""Fuzzing the spec front door: any YAML and any overrides give a valid spec or a clear spec error
(exit 2), never another exception."""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2v.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "experiments" / "asr_demo.yaml").read_text())

KEYS = ["task", "model", "data", "optim", "schedule", "trainer", "preset", "encoder", "head", "name", "layers",
        "dim", "lr", "max_steps", "processor", "train", "loader", "batch_size", "mixed_precision", "output_dir",
        "vocab", "init", "checkpoint", "freeze", "objective", "masking", "heads", "resume", "keep_last", "seed"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["ctc", "audio", "adamw", "fp16", "no"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=4).map(".".join)
override_values = st.one_of(st.text(string.printable.replace("\n", "").replace("\r", ""), max_size=15),
                            scalars.map(lambda v: yaml.safe_dump(v).splitlines()[0] if v is not None else "null"))
overrides = st.lists(st.one_of(st.tuples(paths, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
                               st.text(string.printable.replace("\n", ""), max_size=12)), max_size=3)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(tmp_path, text: str, extra: list[str], capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    capsys.readouterr()
    try:
        code = main(["check", str(spec), *extra])
    except SystemExit as exc:  # argparse: an override that looks like an option ("-x")
        code = exc.code
    assert code in (0, 2), code
    err = capsys.readouterr().err
    if code == 2:
        assert "d2v: error:" in err and "Traceback" not in err


@SETTINGS
@given(document=st.dictionaries(st.sampled_from(KEYS), values, max_size=6), extra=overrides)
def test_random_specs_and_overrides_are_valid_or_a_spec_error(tmp_path, capsys, document, extra):
    _check(tmp_path, yaml.safe_dump(document), extra, capsys)


@SETTINGS
@given(path=paths, value=values, extra=overrides)
def test_mutating_a_real_spec_is_valid_or_a_spec_error(tmp_path, capsys, path, value, extra):
    document = yaml.safe_load(yaml.safe_dump(BASE))
    node = document
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else {}
    node[parts[-1]] = value
    _check(tmp_path, yaml.safe_dump(document), extra, capsys)


@SETTINGS
@given(text=st.text(string.printable, max_size=200))
def test_arbitrary_text_is_a_spec_error(tmp_path, capsys, text):
    _check(tmp_path, text, [], capsys)
