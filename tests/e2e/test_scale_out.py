"""Scale-out you can trust: 2 processes (DDP, and FSDP2 with the shipped experiments/accelerate/
fsdp.yaml) end with the same weights as one process accumulating the same global batch.

Accelerate hands process i the batches i, i+2, ...; one process accumulating twice as many
batches per update sees the same global batch. With dropout off, every other random draw is a
function of the example (crops, flips) or of the batch's ids (data2vec's masks), so the weights
must agree -- for the EMA teacher too. The pretraining cases crop audio (text: pads lines) to
unequal lengths and accumulate on each process, so they also check that an update is normalised
by the sample size of all its micro-batches on all processes (fairseq's rule).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from d2v.cli import main

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


def cpu_fsdp_config(tmp_path: Path, port: int) -> Path:
    """experiments/accelerate/fsdp.yaml as shipped, on 2 CPU processes."""
    config = yaml.safe_load((ROOT / "experiments" / "accelerate" / "fsdp.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no", main_process_port=port)
    config.pop("gpu_ids", None)
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_two(tmp_path: Path, parallel: str, args: list[str], port: int) -> subprocess.CompletedProcess:
    launcher = (["--config_file", str(cpu_fsdp_config(tmp_path, port))] if parallel == "fsdp" else
                ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(port)])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "d2v.cli", "run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process reference of each case, run once for both DDP and FSDP."""
    done: dict[str, Path] = {}

    def run_case(case: str) -> Path:
        if case not in done:
            spec, overrides, accumulate = CASES[case]
            out = tmp_path_factory.mktemp("one") / "run"
            assert main(["run", f"experiments/{spec}", *COMMON, *overrides, f"trainer.grad_accum={2 * accumulate}",
                         f"trainer.output_dir={out}"]) == 0
            done[case] = out
        return done[case]
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
    b = load_file(one_process(case) / "final" / "model.safetensors")
    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"{case} ({parallel}): max weight difference {worst:.2e} over {len(a)} tensors")
    assert worst < 1e-5
