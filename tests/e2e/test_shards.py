"""Tar shards: every modality's examples come back identical, and a run on shards equals a run on files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from d2v.api import plugins
from d2v.cli.main import main
from d2v.spec.config import load_spec
from d2v.api.errors import SpecError
from d2v.spec.model import build_component
from d2v.data.shards import ShardedDataset

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"


def _processed(spec_path: Path, dataset, count: int) -> list[dict]:
    spec = load_spec(spec_path)
    processor = build_component(plugins.registry(), "processor", spec["data"]["processor"], "data.processor")
    return [processor.load(dataset[i], train=False) for i in range(count)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return set(a) - {"source_path"} == set(b) - {"source_path"} and all(
            _same(a[k], b[k]) for k in a if k not in ("path", "source_path", "dataset"))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("spec, split", [("asr_demo.yaml", "valid"), ("vision_cls_demo.yaml", "valid"),
                                         ("mlm_demo.yaml", "valid"), ("sst2_demo.yaml", "valid")])
def test_every_modality_round_trips_through_shards(tmp_path, spec, split, single_thread):
    assert main(["shards", "make", str(EXPERIMENTS / spec), str(tmp_path / "s"), "--split", split, "--max-count", "7"]) == 0
    node = load_spec(EXPERIMENTS / spec)["data"][split]
    source = build_component(plugins.registry(), "dataset", node, f"data.{split}")
    shards = ShardedDataset(str(tmp_path / "s"))
    assert len(shards) == len(source) and len(list((tmp_path / "s").glob("*.tar"))) == -(-len(source) // 7)
    assert getattr(source, "lengths", None) == getattr(shards, "lengths", None)
    light = shards.light_example(0)  # the fields alone, as the runner's look over the corpus reads them
    assert "path" not in light and light["id"] == source[0]["id"]
    count = min(9, len(source))
    for a, b in zip(_processed(EXPERIMENTS / spec, source, count), _processed(EXPERIMENTS / spec, shards, count)):
        assert _same(a, b)


@pytest.mark.slow
def test_training_on_shards_equals_training_on_the_files(tmp_path, single_thread):
    spec = EXPERIMENTS / "asr_demo.yaml"
    assert main(["shards", "make", str(spec), str(tmp_path / "shards"), "--max-count", "64"]) == 0
    common = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.eval_before_training=false",
              "trainer.progress_bar=false", "data.loader.num_workers=1"]
    assert main(["run", str(spec), *common, f"trainer.output_dir={tmp_path / 'files'}"]) == 0
    assert main(["run", str(spec), *common, f"trainer.output_dir={tmp_path / 'tar'}",
                 f"data.train={{name: shards, index: {tmp_path / 'shards'}}}"]) == 0
    a = load_file(tmp_path / "files" / "final" / "model.safetensors")
    b = load_file(tmp_path / "tar" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_foreign_indexes_are_clear_errors(tmp_path):
    with pytest.raises(SpecError, match="d2v shards make"):
        ShardedDataset(str(tmp_path))
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(SpecError, match="not a d2v shard index"):
        ShardedDataset(str(tmp_path))
