"""The data2vec 2.0 vision demo end to end: pretraining data2vec 2.0's ViT lowers the loss
without collapse, and its checkpoint initialises an image classifier on the same ViT (every
backbone weight loads)."""

import json
from pathlib import Path

import pytest
import yaml

from d2v.spec.config import load_spec
from d2v.train import Run, run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def test_vit_pretrain_then_finetune(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pre = tmp_path / "pre"
    run(load_spec(ROOT / "experiments" / "pretrain2_vision_demo.yaml",
                  [f"trainer.output_dir={pre}", "trainer.max_steps=12", "trainer.log_every=1",
                   "trainer.progress_bar=false", "data.train.max_examples=64", "data.valid.max_examples=16",
                   "data.loader.batch_size=16"]))
    train = [r for r in map(json.loads, (pre / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "train"]
    assert len(train) == 12 and all(r["target_std"] > 0.1 for r in train)
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])

    # the classification demo's data and recipe on the pretrained ViT
    spec = yaml.safe_load((ROOT / "experiments" / "vision_cls_demo.yaml").read_text())
    spec["model"] = {"preset": "data2vec2-vision-tiny", "head": spec["model"]["head"],
                     "init": {"checkpoint": str(pre / "final")}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(spec))
    runner = Run(load_spec(tmp_path / "ft.yaml", [f"trainer.output_dir={tmp_path / 'ft'}", "trainer.max_steps=2",
                                                  "trainer.progress_bar=false", "trainer.eval_before_training=false",
                                                  "data.valid.max_examples=16"]))
    report = capsys.readouterr().out
    new = report.split("new (randomly initialised)")[1].split("\n")[0]
    assert "head.classifier" in new and "encoder.pooler_norm" in new
    assert "encoder.layers" not in new and "feature_extractor" not in new and "shape mismatch" not in report
    runner.train()
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()
