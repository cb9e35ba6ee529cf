"""The package as a third-party plugin: found through its entry point, listed, not in d2v's
manifest, and its demo specs validate against the live registry."""

from pathlib import Path

import pytest

from d2v.api import manifest
from d2v.cli.main import main
from d2v.spec.config import load_spec, validate

PACKAGE = Path(__file__).resolve().parents[1]

SPECS = ["pretrain2_sensors_demo.yaml", "cls_sensors_demo.yaml", "cls_sensors_scratch.yaml"]


def test_discovered_through_entry_point(sensors_plugins):
    registry = sensors_plugins.registry()
    for kind, name in (("feature_extractor", "sensors.patches"), ("processor", "sensors"),
                       ("dataset", "sensor_synthetic"), ("dataset", "sensor_folder"), ("model", "data2vec-sensors-tiny")):
        assert registry.get(kind, name).plugin == "sensors"
    assert sensors_plugins.distributions["sensors"] == "d2v-sensors"
    listed = {c["name"] for kind in manifest.manifest().values() for c in kind}
    assert "sensors.patches" not in listed and "sensor_synthetic" not in listed


def test_listed_by_d2v_list(sensors_plugins, capsys):
    assert main(["list", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "sensor_synthetic" in out and "[sensors]" in out


@pytest.mark.parametrize("name", SPECS)
def test_demo_specs_validate(sensors_plugins, name):
    validate(load_spec(PACKAGE / "experiments" / name))


def test_bad_spec_key_gets_did_you_mean(sensors_plugins):
    spec = load_spec(PACKAGE / "experiments" / "cls_sensors_scratch.yaml", ["data.processor.channel=3"])
    with pytest.raises(Exception, match="did you mean 'channels'"):
        validate(spec)


def test_synth_subcommand_through_d2v(sensors_plugins, tmp_path, capsys):
    assert main(["sensors", "synth", str(tmp_path), "--examples", "6", "--format", "csv"]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "train").rglob("*.csv")) == sorted(
        ["walk", "run", "cycle", "stairs", "jump", "idle"])
    assert main(["sensors", "synth", str(tmp_path), "--examples", "6"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
