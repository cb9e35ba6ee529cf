"""Pretraining demos (data2vec 1.0 and 2.0) feed the ASR demo: pretrain -> fine-tune end to end."""

import json
from pathlib import Path

import pytest

from d2v.config import load_spec
from d2v.runner import Run, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec_name", ["pretrain_audio_demo.yaml", "pretrain2_audio_demo.yaml"])
def test_pretrain_then_finetune(spec_name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pre = tmp_path / "pre"
    run(load_spec(ROOT / "experiments" / spec_name,
                  [f"trainer.output_dir={pre}", "trainer.max_steps=8", "trainer.log_every=1", "trainer.progress_bar=false",
                   "data.valid.max_examples=8"]))
    records = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == 8 and all(r["target_std"] > 0.1 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]

    runner = Run(load_spec(ROOT / "experiments" / "asr_demo.yaml",
                           [f"model.init.checkpoint={pre / 'final'}", f"trainer.output_dir={tmp_path / 'ft'}",
                            "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.eval_before_training=false",
                            "data.valid.max_examples=8"]))
    report = capsys.readouterr().out
    assert "new (randomly initialised): head.proj.* (2)" in report
    assert "unused from checkpoint" in report and "teacher" in report
    runner.train()
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()
