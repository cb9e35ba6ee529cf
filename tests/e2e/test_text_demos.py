"""The text demos end to end (shortened): every head's demo improves its metric over the
untrained baseline and exports to its Hugging Face class; both pretraining demos lower the loss
without collapse, and a fine-tune from the pretraining checkpoint works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.interop.convert import convert
from d2v.train import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# spec, steps, metric (higher is better), the HF architecture its checkpoint exports to
DEMOS = {
    "sst2": ("sst2_demo.yaml", 150, "accuracy", "Data2VecTextForSequenceClassification"),
    "ner": ("ner_demo.yaml", 60, "f1", "Data2VecTextForTokenClassification"),
    "squad": ("squad_demo.yaml", 150, "f1", "Data2VecTextForQuestionAnswering"),
    "swag": ("swag_demo.yaml", 200, "accuracy", "Data2VecTextForMultipleChoice"),
    "mlm": ("mlm_demo.yaml", 100, "accuracy", "Data2VecTextForMaskedLM"),
    "clm": ("clm_demo.yaml", 100, "next_token_accuracy", "Data2VecTextForCausalLM"),
}


def _run(spec: str, out: Path, steps: int, *extra: str) -> tuple[dict, list[dict]]:
    final = run(load_spec(ROOT / "experiments" / spec, [
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
        "trainer.progress_bar=false", "trainer.log_every=10", *extra]))
    return final, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_improves_its_metric(name, tmp_path, monkeypatch):
    spec, steps, metric, architecture = DEMOS[name]
    monkeypatch.chdir(ROOT)
    final, records = _run(spec, tmp_path / "run", steps)
    before = next(r for r in records if r.get("split") == "valid" and r["step"] == 0)[metric]
    train = [r["loss"] for r in records if r.get("split") == "train"]
    assert train[-1] < train[0]
    assert final[metric] > before + 5, (metric, before, final[metric])

    convert(tmp_path / "run" / "final", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert (tmp_path / "hf" / "vocab.json").is_file()  # the tokenizer travels with the weights
    if name == "sst2":  # the spec gives only num_labels: the names come from the GLUE data
        assert config["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("spec", ["pretrain_text_demo.yaml", "pretrain2_text_demo.yaml"])
def test_pretraining_lowers_the_loss_and_fine_tunes(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _, records = _run(spec, tmp_path / "pre", 60, "trainer.log_every=20")
    train = [r for r in records if r.get("split") == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["target_std"] > 0.1 and train[-1]["pred_std"] > 0.01  # no collapse
    final, records = _run("sst2_demo.yaml", tmp_path / "ft", 150, f"model.init.checkpoint={tmp_path / 'pre' / 'final'}")
    before = next(r for r in records if r.get("split") == "valid" and r["step"] == 0)["accuracy"]
    assert final["accuracy"] > before + 5
