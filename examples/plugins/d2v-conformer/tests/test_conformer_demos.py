"""The package's two demo specs, shortened: data2vec 2.0 pretraining of the Conformer lowers its
loss, and CTC fine-tuning from that checkpoint loads the whole backbone and lowers the CTC loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2v.spec.config import load_spec, validate
from d2v.train import Run, run

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[2]  # the repository: the specs name the demo corpus relative to it
PRETRAIN = PACKAGE / "experiments" / "pretrain2_conformer_demo.yaml"
FINETUNE = PACKAGE / "experiments" / "asr_conformer_demo.yaml"
SHORT = ["trainer.log_every=1", "trainer.progress_bar=false", "data.valid.max_examples=8"]


@pytest.fixture(autouse=True)
def single_thread(monkeypatch):
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("split") == "train"]


def test_specs_validate():
    validate(load_spec(PRETRAIN))
    validate(load_spec(FINETUNE))
    validate(load_spec(FINETUNE, ["model.init=null"]))


def test_pretrain_lowers_the_loss_then_ctc_fine_tuning_from_it_lowers_the_ctc_loss(tmp_path, capsys):
    pre = tmp_path / "pre"
    run(load_spec(PRETRAIN, [f"trainer.output_dir={pre}", "trainer.max_steps=10", *SHORT]))
    losses = train_losses(pre)
    assert len(losses) == 10 and losses[-1] < losses[0]

    runner = Run(load_spec(FINETUNE, [f"model.init.checkpoint={pre / 'final'}", f"trainer.output_dir={tmp_path / 'ft'}",
                                      "trainer.max_steps=30", "trainer.eval_before_training=false",
                                      "trainer.eval_every=0", *SHORT]))
    report = capsys.readouterr().out
    assert "0 shape-mismatched" in report and "new (randomly initialised): head.proj.* (2)" in report
    runner.train()
    losses = train_losses(tmp_path / "ft")
    assert len(losses) == 30 and sum(losses[-3:]) < 0.5 * sum(losses[:3])
