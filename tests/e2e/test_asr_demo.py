"""The ASR demo spec end to end (shortened), evaluation, multi-process, missing data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2v.spec.config import load_spec
from d2v.train import Run, run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "asr_demo.yaml"
TEST_SPLIT = ROOT / "experiments" / "data" / "speech_demo" / "LibriSpeech" / "test-demo"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("asr") / "run"
    with pytest.MonkeyPatch.context() as patch:  # the spec's data paths are relative to the repository
        patch.chdir(ROOT)
        metrics = run(load_spec(DEMO, [f"trainer.output_dir={out}", "trainer.max_steps=40", "trainer.log_every=5",
                                       "trainer.eval_every=0", "trainer.save_every=20", "trainer.progress_bar=false",
                                       "trainer.eval_before_training=false"]))
    return out, metrics


def levenshtein(a, b) -> int:
    """Edit distance by the full dynamic-programming table (independent of d2v_heads.speech.error_rates)."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def rates_from_hypotheses(path: Path) -> dict[str, float]:
    """WER and CER (percent) of a hypotheses.tsv, errors summed over the utterances and divided by
    the reference's words / characters (whitespace collapsed, spaces count), as jiwer does."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    words = sum(levenshtein(ref.split(), hyp.split()) for _, ref, hyp in rows) / sum(len(ref.split()) for _, ref, _ in rows)
    chars = (sum(levenshtein(" ".join(ref.split()), " ".join(hyp.split())) for _, ref, hyp in rows)
             / sum(len(" ".join(ref.split())) for _, ref, _ in rows))
    return {"wer": 100 * words, "cer": 100 * chars}


def test_demo_training_lowers_ctc_loss(short_demo):
    out, metrics = short_demo
    train = [r for r in _records(out / "metrics.jsonl") if r.get("split") == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert {"wer", "cer", "ctc_loss"} <= set(metrics)
    assert (out / "final" / "model.safetensors").exists()


def test_evaluate_task_reports_the_wer_of_the_hypotheses_it_writes(short_demo, tmp_path, monkeypatch):
    """task=evaluate on the test split writes one hypothesis per utterance, and the WER/CER it reports
    are those of the hypotheses it wrote. The untrained model (the spec's seed-1 initialisation, saved
    as a checkpoint) spells out long strings of letters (CER ~308%), the 40-step model has learned to
    stay silent on the all-blank plateau (CER 100%): lower CER and CTC loss."""
    out, _ = short_demo
    monkeypatch.chdir(ROOT)
    initial = Run(load_spec(DEMO, [f"trainer.output_dir={tmp_path / 'init'}", "trainer.progress_bar=false"]))
    transcripts = dict(line.split(" ", 1) for path in sorted(TEST_SPLIT.glob("*/*/*.trans.txt"))
                       for line in path.read_text().splitlines())
    results = {}
    for name, checkpoint in (("trained", out / "final"), ("untrained", initial.save_final(initial.model))):
        directory = tmp_path / name
        metrics = run(load_spec(DEMO, ["task=evaluate", f"evaluate.checkpoint={checkpoint}", "evaluate.split=test",
                                       f"trainer.output_dir={directory}"]))
        lines = (directory / "hypotheses.tsv").read_text().splitlines()
        assert lines[0] == "id\treference\thypothesis" and len(lines) == 61
        assert {line.split("\t")[0]: line.split("\t")[1] for line in lines[1:]} == transcripts  # each id its own text
        assert json.loads((directory / "test_metrics.json").read_text()) == pytest.approx(metrics)
        recomputed = rates_from_hypotheses(directory / "hypotheses.tsv")
        assert metrics["wer"] == pytest.approx(recomputed["wer"]) and metrics["cer"] == pytest.approx(recomputed["cer"])
        results[name] = metrics, [line.split("\t")[2] for line in lines[1:]]
    (trained, _), (untrained, untrained_hyps) = results["trained"], results["untrained"]
    assert sum(len(h) for h in untrained_hyps) > 1000  # non-trivial hypotheses: the recomputation means something
    assert untrained["cer"] > 150
    assert trained["cer"] < untrained["cer"] - 50 and trained["ctc_loss"] < 0.5 * untrained["ctc_loss"]


def test_two_process_accelerate_launch(tmp_path):
    out = tmp_path / "ddp"
    # --multi_gpu asks accelerate for a torchrun-style launch; with no GPU d2v runs both processes on CPU (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "d2v.cli", "run", str(DEMO), f"trainer.output_dir={out}", "trainer.max_steps=3",
           "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress_bar=false",
           "trainer.eval_before_training=false", "data.valid.max_examples=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # an abort prints Python stacks
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
