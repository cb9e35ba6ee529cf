"""Scale-out you can trust: 2 processes (DDP, FSDP2 with the shipped experiments/accelerate/
fsdp.yaml, DeepSpeed ZeRO-2 with the shipped deepspeed_zero2.yaml) end with the same weights as one
process accumulating the same global batch, after the same losses and gradient norms.

Accelerate hands process i the batches i, i+2, ...; one process accumulating twice as many
batches per update sees the same global batch. With dropout off, every other random draw is a
function of the example (crops, flips) or of the batch's ids (data2vec's masks), so the weights
must agree -- for the EMA teacher too. The pretraining cases crop audio (text: pads lines) to
unequal lengths and accumulate on each process, so they also check that an update is normalised
by the sample size of all its micro-batches on all processes (fairseq's rule). Under DeepSpeed an
objective cannot accumulate (it steps inside backward): each process runs one micro-batch per
update there, and the normalisation is checked across processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from d2v.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_before_training=false",
          "trainer.progress_bar=false", "trainer.save_every=0", "trainer.log_every=1", "data.valid.max_examples=4"]
AUDIO_OFF = ["model.encoder.dropout=0", "model.encoder.attention_dropout=0", "model.encoder.activation_dropout=0",
             "model.feature_extractor.feat_proj_dropout=0"]
#: data2vec 2.0's decoder input: dropout and the noise vectors at masked positions
DECODER_OFF = ["model.objective.decoder_input_dropout=0", "model.objective.mask_noise_std=0"]
TEXT_OFF = ["model.encoder.dropout=0", "model.encoder.attention_dropout=0", "model.feature_extractor.dropout=0"]
#: case -> (spec, overrides, micro-batches per update on each of the 2 processes)
CASES = {
    "audio ctc": ("asr_demo.yaml", [*AUDIO_OFF, "model.encoder.mask_time_prob=0", "model.head.final_dropout=0",
                                    "data.loader.batch_size=4", "data.loader.max_batch_seconds=null"], 1),
    "text classification": ("sst2_demo.yaml", [*TEXT_OFF, "model.head.classifier_dropout=0",
                                               "data.loader.batch_size=8"], 1),
    "image classification": ("vision_cls_demo.yaml", ["model.encoder.drop_path_rate=0", "data.loader.batch_size=8"], 1),
    "data2vec audio": ("pretrain_audio_demo.yaml", [*AUDIO_OFF, "data.loader.batch_size=3",
                                                    "data.loader.max_batch_seconds=null"], 2),
    "data2vec 2.0 audio": ("pretrain2_audio_demo.yaml", [*AUDIO_OFF, *DECODER_OFF,
                                                         "model.objective.clone_batch=2", "data.loader.batch_size=3",
                                                         "data.loader.max_batch_seconds=null"], 2),
    "data2vec 2.0 text": ("pretrain2_text_demo.yaml", [*TEXT_OFF, *DECODER_OFF,
                                                       "data.loader.batch_size=4"], 2),
    "data2vec images": ("pretrain_vision_demo.yaml", ["model.encoder.drop_path_rate=0", "data.loader.batch_size=8"], 1),
}


#: the DeepSpeed cases: one micro-batch per update on each process
DEEPSPEED_CASES = {"audio ctc": 1, "text classification": 1, "data2vec audio": 1, "data2vec 2.0 audio": 1}
#: accelerate launch's files, by how the test names them
SHIPPED = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -e '.[test]' installs it)")


def cpu_config(tmp_path: Path, parallel: str, port: int) -> Path:
    """The shipped experiments/accelerate file as it is, on 2 CPU processes in full precision."""
    config = yaml.safe_load((ROOT / "experiments" / "accelerate" / SHIPPED[parallel]).read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no", main_process_port=port)
    config.pop("gpu_ids", None)
    path = tmp_path / f"{parallel}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_two(tmp_path: Path, parallel: str, args: list[str], port: int, *, script: list[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    launcher = (["--config_file", str(cpu_config(tmp_path, parallel, port))] if parallel in SHIPPED else
                ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(port)])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *(script or ["-m", "d2v.cli"]), "run", *args]
    # PYTHONFAULTHANDLER: a worker that aborts prints every thread's Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def train_records(run_dir: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r.get("split") == "train"]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """The same steps, losses and gradient norms were logged (within float32 rounding)."""
    ours, theirs = train_records(run_dir), train_records(reference)
    assert [r[0] for r in ours] == [r[0] for r in theirs]
    assert [x for r in ours for x in r[1:]] == pytest.approx([x for r in theirs for x in r[1:]], rel=1e-5)


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process reference of each case, run once for both DDP and FSDP."""
    done: dict[str, Path] = {}

    def run_case(case: str, accumulate: int | None = None) -> Path:
        spec, overrides, accumulate = (*CASES[case][:2], accumulate or CASES[case][2])
        if (case, accumulate) not in done:
            out = tmp_path_factory.mktemp("one") / "run"
            assert main(["run", f"experiments/{spec}", *COMMON, *overrides, f"trainer.grad_accum={2 * accumulate}",
                         f"trainer.output_dir={out}"]) == 0
            done[case, accumulate] = out
        return done[case, accumulate]
    return run_case


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_accumulating_the_same_global_batch(case, parallel, tmp_path, one_process,
                                                                            single_thread):
    os.chdir(ROOT)
    spec, overrides, accumulate = CASES[case]
    port = 29600 + 2 * list(CASES).index(case) + (parallel == "fsdp")
    two = launch_two(tmp_path, parallel, [f"experiments/{spec}", *COMMON, *overrides,
                                          f"trainer.grad_accum={accumulate}", f"trainer.output_dir={tmp_path / 'two'}"],
                     port)
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "rank" in line)[-4000:]
    assert "2 process(es)" in two.stdout
    if parallel == "fsdp":  # really sharded, per Transformer block (student and teacher)
        assert "FSDP shard units:" in two.stdout and "not units of their own" not in two.stdout
    a = load_file(tmp_path / "two" / "final" / "model.safetensors")
    worst = max_difference(a, load_file(one_process(case) / "final" / "model.safetensors"))
    print(f"{case} ({parallel}): max weight difference {worst:.2e} over {len(a)} tensors")
    assert worst < 1e-5
    assert_same_training(tmp_path / "two", one_process(case))


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("case", list(DEEPSPEED_CASES))
def test_two_deepspeed_processes_equal_one_process_accumulating_the_same_global_batch(case, tmp_path, one_process,
                                                                                      single_thread):
    """DeepSpeed ZeRO-2, really (not the DDP Accelerate falls back to on CPUs): the same weights,
    losses and gradient norms (an objective's update normalised across the processes: Adam
    would hide a wrong scale of the gradients, the logged norm does not), fp32 final weights
    and an fp32 EMA teacher."""
    os.chdir(ROOT)
    spec, overrides, _ = CASES[case]
    accumulate = DEEPSPEED_CASES[case]
    port = 29700 + list(DEEPSPEED_CASES).index(case)
    two = launch_two(tmp_path, "deepspeed", [f"experiments/{spec}", *COMMON, *overrides,
                                             f"trainer.grad_accum={accumulate}", f"trainer.output_dir={tmp_path / 'two'}"],
                     port)
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "rank" in line)[-4000:]
    assert "DEEPSPEED ZeRO-2 over 2 processes (gloo on CPUs)" in two.stdout
    a = load_file(tmp_path / "two" / "final" / "model.safetensors")
    reference = one_process(case, accumulate)
    worst = max_difference(a, load_file(reference / "final" / "model.safetensors"))
    print(f"{case} (deepspeed): max weight difference {worst:.2e} over {len(a)} tensors")
    assert worst < 1e-5
    assert_same_training(tmp_path / "two", reference)
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.slow
@needs_deepspeed
def test_a_non_finite_loss_skips_the_deepspeed_update_as_it_skips_one_process_update(tmp_path, single_thread):
    """A NaN added to one process's loss leaves its gradients finite, which DeepSpeed would apply
    while d2v logged a skipped update. The update is skipped: the run ends as one process does
    that skips the same update (process 0's second micro-batch is the one process's third)."""
    os.chdir(ROOT)
    spec, overrides, _ = CASES["audio ctc"]
    args = [f"experiments/{spec}", *COMMON, *overrides]
    one = subprocess.run([sys.executable, "tests/inject_nan_loss.py", "run", *args, "trainer.grad_accum=2",
                          f"trainer.output_dir={tmp_path / 'one'}"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "D2V_NAN_LOSS": "0:3"}, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two(tmp_path, "deepspeed", [*args, f"trainer.output_dir={tmp_path / 'two'}"], 29710,
                     script=["tests/inject_nan_loss.py"], env={"D2V_NAN_LOSS": "0:2"})
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "rank" in line)[-4000:]
    for run_dir in (tmp_path / "one", tmp_path / "two"):
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        skipped = [e for e in events if e.get("event") == "skipped_update"]
        assert len(skipped) == 1 and skipped[0]["step"] == 1 and "loss nan" in skipped[0]["reason"]
        assert [r[0] for r in train_records(run_dir)] == [1, 2, 3]
    worst = max_difference(load_file(tmp_path / "two" / "final" / "model.safetensors"),
                           load_file(tmp_path / "one" / "final" / "model.safetensors"))
    print(f"skipped update (deepspeed): max weight difference {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.slow
@needs_deepspeed
def test_what_deepspeed_cannot_do_exactly_stops_the_launch_at_start(tmp_path):
    os.chdir(ROOT)
    spec, overrides, _ = CASES["audio ctc"]
    config = cpu_config(tmp_path, "deepspeed", 29711)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "-m", "d2v.cli", "run", f"experiments/{spec}", *COMMON, *overrides, "model.encoder.layerdrop=0.1",
           f"trainer.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode != 0
    assert "d2v: error: model.encoder.layerdrop > 0 (AudioTransformerEncoder) cannot run under DeepSpeed" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_an_fsdp_pretraining_run_resumed_after_a_crash_ends_as_the_uninterrupted_run(tmp_path, single_thread):
    """data2vec 2.0 with its EMA teacher under FSDP2: a copy of the run as it was when the
    step-2 checkpoint was written (the later checkpoint and final/ gone, as after a crash)
    resumes from Accelerate's FSDP checkpoint and ends with the uninterrupted run's weights.

    Once in about ten CI runs a worker of the resumed run died of SIGABRT on 2 busy CPU cores.
    The one such abort caught since (a DDP run) came after the run had finished, at interpreter
    teardown, and workers now skip that teardown (d2v.train.shutdown); as it is not known that this
    was the FSDP case's abort too, such a launch is still tried once more, with its stderr kept in
    a warning, so a real difference still fails and an abort stays visible."""
    import shutil

    os.chdir(ROOT)
    spec, overrides, _ = CASES["data2vec 2.0 audio"]
    args = [f"experiments/{spec}", *COMMON, *overrides, "trainer.max_steps=4", "trainer.save_every=2",
            "trainer.keep_last=3"]
    whole = launch_two(tmp_path, "fsdp", [*args, f"trainer.output_dir={tmp_path / 'whole'}"], 29690)
    assert whole.returncode == 0, "\n".join(line for line in whole.stderr.splitlines() if "rank" in line)[-4000:]
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-00000004")
    (crashed / "checkpoints" / "latest").write_text("step-00000002")
    for attempt in range(2):  # see the docstring: one retry for an abort of a worker, said as a warning
        run_dir = tmp_path / f"resumed-{attempt}"
        shutil.copytree(crashed, run_dir)
        resumed = launch_two(tmp_path, "fsdp", [*args, f"trainer.output_dir={run_dir}", "--resume"], 29691 + attempt)
        if resumed.returncode == 0 or "Signal 6 (SIGABRT)" not in resumed.stderr:
            break
        warnings.warn(f"FSDP resume: a worker aborted (SIGABRT), attempt {attempt + 1}; its stderr ends: "
                      f"{resumed.stderr[-1500:]}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout and "at step 2" in resumed.stdout
    assert max_difference(load_file(run_dir / "final" / "model.safetensors"),
                          load_file(tmp_path / "whole" / "final" / "model.safetensors")) == 0.0
