"""Pretraining demos (data2vec 1.0 and 2.0) feed the ASR demo: pretrain -> fine-tune end to end."""

import json
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.train import Run, run

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

    # the fine-tuning backbone must be the pretrained one: 2.0 audio adds ALiBi and keeps padding
    same_backbone = ["model.encoder.alibi=true", "model.encoder.zero_padded_frames=false"] if "2" in spec_name else []
    runner = Run(load_spec(ROOT / "experiments" / "asr_demo.yaml",
                           [f"model.init.checkpoint={pre / 'final'}", f"trainer.output_dir={tmp_path / 'ft'}",
                            "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.eval_before_training=false",
                            "data.valid.max_examples=8", *same_backbone]))
    report = capsys.readouterr().out
    assert "new (randomly initialised): head.proj.* (2)" in report
    assert "unused from checkpoint" in report and "teacher" in report
    runner.train()
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()


def test_a_backbone_that_differs_from_the_checkpoint_is_refused_with_its_settings(tmp_path, monkeypatch, capsys):
    """Fine-tuning a 2.0 checkpoint without its ALiBi would silently drop the learned scales."""
    from d2v.cli.main import main

    monkeypatch.chdir(ROOT)
    pre = tmp_path / "pre"
    assert main(["run", "experiments/pretrain2_audio_demo.yaml", f"trainer.output_dir={pre}", "trainer.max_steps=1",
                 "trainer.progress_bar=false", "data.valid.max_examples=4"]) == 0
    assert main(["run", "experiments/asr_demo.yaml", f"model.init.checkpoint={pre / 'final'}",
                 f"trainer.output_dir={tmp_path / 'ft'}", "trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "encoder.alibi_scale" in err and "alibi: true" in err and "zero_padded_frames: false" in err
