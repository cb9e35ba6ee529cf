"""The three audio task demos end to end (shortened): each improves its metric over the untrained
baseline, and its checkpoint exports to Hugging Face with ``d2v convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.interop.convert import convert
from d2v.train import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# spec, steps, metric, the least improvement over the untrained model (negative: lower is better),
# the HF architecture its checkpoint exports to. Measured (seed 1): keywords accuracy 16.7 (chance,
# 6 words) -> 58.3, frames F1 35.8 -> 52.0, speakers EER 45.8 -> 31.2; the margins are about half that.
DEMOS = {
    "keywords": ("keywords_demo.yaml", 60, "accuracy", 20.0, "Data2VecAudioForSequenceClassification"),
    "frames": ("frames_demo.yaml", 60, "frame_f1", 8.0, "Data2VecAudioForAudioFrameClassification"),
    "speakers": ("speakers_demo.yaml", 300, "eer", -7.0, "Data2VecAudioForXVector"),
}


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_improves_its_metric(name, tmp_path, monkeypatch):
    spec, steps, metric, margin, architecture = DEMOS[name]
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    final = run(load_spec(ROOT / "experiments" / spec, [
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
        "trainer.progress_bar=false", "trainer.log_every=10"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("split") == "valid" and r["step"] == 0)[metric]
    train = [r["loss"] for r in records if r.get("split") == "train"]
    assert train[-1] < train[0]
    improved = final[metric] > before + margin if margin > 0 else final[metric] < before + margin
    assert improved, (metric, before, final[metric])

    convert(out / "final", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
