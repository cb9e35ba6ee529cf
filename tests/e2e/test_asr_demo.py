"""The ASR demo spec end to end (shortened), evaluation, multi-process, missing data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2v.config import load_spec
from d2v.runner import run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "asr_demo.yaml"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("asr") / "run"
    os.chdir(ROOT)
    metrics = run(load_spec(DEMO, [f"trainer.output_dir={out}", "trainer.max_steps=40", "trainer.log_every=5",
                                   "trainer.eval_every=0", "trainer.save_every=20", "trainer.progress_bar=false",
                                   "trainer.eval_before_training=false"]))
    return out, metrics


def test_demo_training_lowers_ctc_loss(short_demo):
    out, metrics = short_demo
    train = [r for r in _records(out / "metrics.jsonl") if r.get("split") == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert {"wer", "cer", "ctc_loss"} <= set(metrics)
    assert (out / "final" / "model.safetensors").exists()


def test_evaluate_task_reports_wer_and_writes_hypotheses(short_demo, tmp_path):
    out, _ = short_demo
    metrics = run(load_spec(DEMO, ["task=evaluate", f"evaluate.checkpoint={out / 'final'}", "evaluate.split=test",
                                   f"trainer.output_dir={tmp_path}"]))
    lines = (tmp_path / "hypotheses.tsv").read_text().splitlines()
    assert lines[0] == "id\treference\thypothesis" and len(lines) == 61
    assert 0 <= metrics["cer"] <= 100 * 2
    assert json.loads((tmp_path / "test_metrics.json").read_text())["wer"] == pytest.approx(metrics["wer"])


def test_two_process_accelerate_launch(tmp_path):
    out = tmp_path / "ddp"
    # --multi_gpu asks accelerate for a torchrun-style launch; with no GPU d2v runs both processes on CPU (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "d2v.cli", "run", str(DEMO), f"trainer.output_dir={out}", "trainer.max_steps=3",
           "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress_bar=false",
           "trainer.eval_before_training=false", "data.valid.max_examples=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("final:") == 1  # only the main process reports
    train = [r for r in _records(out / "metrics.jsonl") if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    valid = [r for r in _records(out / "metrics.jsonl") if r.get("split") == "valid"]
    assert valid and "wer" in valid[-1]
    assert (out / "final" / "model.safetensors").exists()


def test_ls960_without_librispeech_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "d2v.cli", "run", "experiments/asr_ls960.yaml",
                             f"data.train.root={tmp_path / 'LibriSpeech'}", f"trainer.output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "LibriSpeech" in result.stderr and "does not exist" in result.stderr and "openslr.org/12" in result.stderr
