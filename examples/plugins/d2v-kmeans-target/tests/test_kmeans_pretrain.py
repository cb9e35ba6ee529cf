"""The plugin as a user meets it: found through its entry point, swapped into the data2vec 2.0
vision demo by one line, and pretraining with it lowers the loss; data2vec 1.0 takes it too."""

from __future__ import annotations

import json
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from d2v.api import manifest
from d2v.api import plugins
from d2v.spec.config import load_spec, validate
from d2v.spec.model import build_model
from d2v.train import run

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[2]
SPEC = PACKAGE / "experiments" / "pretrain2_vision_kmeans.yaml"
DATA2VEC_SPEC = ROOT / "experiments" / "pretrain2_vision_demo.yaml"


def entry_points() -> dict[str, str]:
    return tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["entry-points"]["d2v"]


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    """The plugin loaded from its entry point: the installed one (``pip install -e``), or else
    the package laid out as pip would (module + dist-info with entry_points.txt)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores: one thread is fastest
    installed = {ep.name for ep in metadata.entry_points(group="d2v")}
    monkeypatch = pytest.MonkeyPatch()
    if not set(entry_points()) <= installed:
        site = tmp_path_factory.mktemp("site-packages")
        shutil.copytree(PACKAGE / "d2v_kmeans_target", site / "d2v_kmeans_target")
        dist_info = site / "d2v_kmeans_target-0.1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2v-kmeans-target\nVersion: 0.1.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points().items())
        (dist_info / "entry_points.txt").write_text(f"[d2v]\n{lines}")
        monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    yield
    plugins.reset()
    monkeypatch.undo()
    torch.set_num_threads(threads)


def test_listed_as_a_third_party_target(discovered):
    component = plugins.registry().get("target", "kmeans")
    assert component.plugin == "kmeans-target"
    assert plugins.distributions["kmeans-target"] == "d2v-kmeans-target"
    assert "kmeans" not in [t["name"] for t in manifest.manifest().get("target", [])]
    assert component.parameters()["clusters"] == 64


@pytest.mark.parametrize("path", sorted((PACKAGE / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_spec_validates(discovered, path):
    validate(load_spec(path))


def test_the_spec_is_the_data2vec_demo_with_the_target_swapped():
    ours, theirs = yaml.safe_load(SPEC.read_text()), yaml.safe_load(DATA2VEC_SPEC.read_text())
    assert ours["model"]["objective"].pop("target")["name"] == "kmeans"
    assert theirs["model"]["objective"].pop("target")["name"] == "data2vec"
    for spec in (ours, theirs):  # where the run goes and what it calls itself
        spec.pop("description")
        spec["trainer"].pop("output_dir")
    assert ours == theirs


def test_short_pretraining_lowers_the_loss_and_saves_the_codebook(discovered, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "pre"
    run(load_spec(SPEC, [f"trainer.output_dir={out}", "trainer.max_steps=12", "trainer.log_every=1",
                         "trainer.progress_bar=false", "data.train.max_examples=64", "data.valid.max_examples=16",
                         "data.loader.batch_size=16"]))
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "train"]
    assert len(train) == 12 and all(r["target_std"] > 0.1 for r in train)
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as weights:
        centroids = weights.get_tensor("target.codebook.centroids")
        assert "target.classifier.weight" in weights.keys()
    assert centroids.shape == (32, 64) and float(centroids.abs().sum()) > 0


def test_data2vec_1_with_the_encoder_width_in_the_spec(discovered):
    torch.manual_seed(0)
    model = build_model(
        {"preset": "data2vec-audio-tiny", "encoder": {"dropout": 0.0, "layerdrop": 0.0},
         "objective": {"name": "data2vec", "masking": {"name": "span", "mask_prob": 0.5, "mask_length": 3},
                       "target": {"name": "kmeans", "clusters": 8, "top_k": 2, "dim": 64}}},
        plugins.registry(), "pretrain")
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randn(2, 4800, generator=g), "padding_mask": torch.zeros(2, 4800, dtype=torch.bool)}
    out = model(batch)
    # a fresh classifier is close to uniform over the 8 clusters
    assert float(out.loss.detach()) == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=0.15)
    out.loss.backward()
    assert model.target.classifier.weight.grad.abs().sum() > 0
    assert model.regression_head.weight.grad.abs().sum() > 0
