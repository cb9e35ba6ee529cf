"""The demo recipes, shrunk: data2vec 2.0 pretraining lowers its loss, its checkpoint fills every
backbone weight of the classifier, and fine-tuning on a few labels raises validation accuracy."""

import json
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.train import Run, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _records(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("split") == split]


def test_pretrain_then_finetune(sensors_plugins, tmp_path, capsys):
    pre = tmp_path / "pre"
    run(load_spec(EXPERIMENTS / "pretrain2_sensors_demo.yaml",
                  [f"trainer.output_dir={pre}", "trainer.max_steps=20", "trainer.log_every=1", "trainer.progress_bar=false",
                   "trainer.eval_every=0", "data.train.num_examples=160", "data.valid=null", "data.loader.batch_size=16",
                   "model.objective.collapse_check_after=1000"]))
    train = _records(pre, "train")
    assert len(train) == 20 and all(r["target_std"] > 0.1 for r in train)
    assert sum(r["loss"] for r in train[-5:]) < 0.8 * sum(r["loss"] for r in train[:5])

    runner = Run(load_spec(EXPERIMENTS / "cls_sensors_demo.yaml",
                           [f"model.init.checkpoint={pre / 'final'}", f"trainer.output_dir={tmp_path / 'ft'}",
                            "trainer.max_steps=30", "trainer.eval_every=0", "trainer.eval_before_training=true",
                            "trainer.progress_bar=false", "data.valid.num_examples=90"]))
    report = capsys.readouterr().out
    assert "0 shape-mismatched" in report
    new = report.split("new (randomly initialised)")[1].split("\n")[0]
    assert "head." in new and "encoder." not in new and "feature_extractor." not in new
    final = runner.train()
    before = _records(tmp_path / "ft", "valid")[0]
    assert before["step"] == 0
    assert final["accuracy"] > before["accuracy"] + 20
