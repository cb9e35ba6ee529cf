"""The three audio task demos end to end (shortened): each improves its metric over the untrained
baseline, and its checkpoint exports to Hugging Face with ``d2v convert``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from d2v.config import load_spec
from d2v.convert import convert
from d2v.runner import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# spec, steps, metric, whether higher is better, the HF architecture its checkpoint exports to
DEMOS = {
    "keywords": ("keywords_demo.yaml", 60, "accuracy", True, "Data2VecAudioForSequenceClassification"),
    "frames": ("frames_demo.yaml", 60, "frame_f1", True, "Data2VecAudioForAudioFrameClassification"),
    "speakers": ("speakers_demo.yaml", 300, "eer", False, "Data2VecAudioForXVector"),
}


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_improves_its_metric(name, tmp_path):
    spec, steps, metric, higher, architecture = DEMOS[name]
    out = tmp_path / "run"
    os.chdir(ROOT)
    final = run(load_spec(ROOT / "experiments" / spec, [
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
        "trainer.progress_bar=false", "trainer.log_every=10"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("split") == "valid" and r["step"] == 0)[metric]
    train = [r["loss"] for r in records if r.get("split") == "train"]
    assert train[-1] < train[0]
    assert (final[metric] > before) if higher else (final[metric] < before), (metric, before, final[metric])

    convert(out / "final", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
