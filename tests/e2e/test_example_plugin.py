"""A third-party plugin that only the tests know about, found through its entry point."""

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from d2v.api import manifest
from d2v.api import plugins
from d2v.spec.config import spec_from_dict, validate
from d2v.train import run

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tests" / "plugins" / "d2v-word-count"
DEMO = ROOT / "experiments" / "data" / "speech_demo" / "LibriSpeech"


@pytest.fixture
def installed_word_count(tmp_path, monkeypatch):
    """Install the package the way pip lays it out: the module plus a dist-info with entry_points.txt."""
    site = tmp_path / "site-packages"
    shutil.copytree(PACKAGE / "d2v_word_count", site / "d2v_word_count")
    dist_info = site / "d2v_word_count-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2v-word-count\nVersion: 0.1.0\n")
    declared = tomllib.loads(PACKAGE.joinpath("pyproject.toml").read_text())["project"]["entry-points"]["d2v"]
    lines = "".join(f"{name} = {target}\n" for name, target in declared.items())
    (dist_info / "entry_points.txt").write_text(f"[d2v]\n{lines}")
    monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    yield
    plugins.reset()


def test_discovered_listed_but_not_in_manifest(installed_word_count):
    component = plugins.registry().get("head", "word_count")
    assert component.plugin == "word-count"
    assert plugins.distributions["word-count"] == "d2v-word-count"
    assert "word_count" not in [h["name"] for h in manifest.manifest().get("head", [])]


def test_used_from_a_spec(installed_word_count, tmp_path):
    spec = {
        "task": "finetune",
        "model": {"preset": "data2vec-audio-tiny", "head": {"name": "word_count", "max_words": 6}},
        "data": {"processor": {"name": "audio"},
                 "train": {"name": "librispeech", "root": str(DEMO), "splits": ["train-demo"], "max_examples": 48},
                 "valid": {"name": "librispeech", "root": str(DEMO), "splits": ["dev-demo"], "max_examples": 16},
                 "loader": {"batch_size": 8}},
        "optim": {"name": "adam", "lr": 2.0e-3},
        "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "log_every": 1, "progress_bar": False},
    }
    validate(spec_from_dict(spec))
    bad = json.loads(json.dumps(spec))
    bad["model"]["head"]["max_word"] = 3
    with pytest.raises(Exception, match="did you mean 'max_words'"):
        validate(spec_from_dict(bad))
    metrics = run(spec_from_dict(spec))
    assert 0.0 <= metrics["accuracy"] <= 100.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])
