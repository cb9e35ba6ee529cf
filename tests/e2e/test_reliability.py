"""Faults a long run meets, injected: divergence, preemption, damaged checkpoints, a second job."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2v.cli.main import main
from d2v.spec.config import load_spec
from d2v.api.errors import SpecError, TrainingCollapse
from d2v.train import loop as train_module
from d2v.train import step as step_module
from d2v.train.guards import PREEMPTED_EXIT_CODE, Preempted, RunLock

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN2 = ROOT / "experiments" / "pretrain2_audio_demo.yaml"
ASR = ROOT / "experiments" / "asr_demo.yaml"
QUIET = ["trainer.progress_bar=false", "trainer.log_every=1"]


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("split") == "train"]


def _signal_on_update(monkeypatch, number: int, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process while the ``number``-th update is being applied."""
    original = step_module.apply_update
    calls = {"n": 0}

    def apply_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(step_module, "apply_update", apply_update)


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_2_0_pretraining_equals_an_uninterrupted_run(tmp_path, monkeypatch, single_thread):
    overrides = QUIET + ["trainer.max_steps=12", "data.loader.num_workers=1"]
    train_module.run(load_spec(PRETRAIN2, overrides + [f"trainer.output_dir={tmp_path / 'a'}"]))

    _signal_on_update(monkeypatch, 5)
    assert main(["run", str(PRETRAIN2), *overrides, f"trainer.output_dir={tmp_path / 'b'}"]) == PREEMPTED_EXIT_CODE
    assert (tmp_path / "b" / "checkpoints" / "step-00000005").is_dir()
    monkeypatch.undo()
    assert main(["run", str(PRETRAIN2), *overrides, f"trainer.output_dir={tmp_path / 'b'}", "trainer.resume=auto"]) == 0

    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, teacher included
    assert _train_steps(tmp_path / "b") == list(range(1, 13))  # no step logged twice


@pytest.mark.slow
def test_a_diverging_run_never_saves_non_finite_weights_and_can_be_resumed(tmp_path, single_thread, capsys):
    run_dir = tmp_path / "run"
    overrides = QUIET + ["optim.lr=1e3", "trainer.save_every=1", "trainer.keep_last=1", "trainer.max_steps=40",
                         "trainer.max_bad_steps=3", f"trainer.output_dir={run_dir}", "trainer.eval_every=0"]
    assert main(["run", str(ASR), *overrides]) == 3
    message = capsys.readouterr().err
    assert "updates in a row were skipped" in message and "The last good checkpoint is" in message
    good = Path(message.split("The last good checkpoint is ")[1].split(".\n")[0].strip().rstrip("."))
    weights = load_file(good / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "skipped_update" for e in events) >= 3
    # checkpoints written after the last update that trained are kept aside, not resumed from
    suspects = list((run_dir / "checkpoints").glob("suspect-step-*"))
    assert all(p.name > f"suspect-{good.name}" for p in suspects)
    # the same run directory continues from the good checkpoint with a sane learning rate
    resumed = QUIET + ["optim.lr=1e-4", "trainer.max_steps=" + str(int(good.name.split("-")[1]) + 2),
                       f"trainer.output_dir={run_dir}", "trainer.save_every=0"]
    assert main(["run", str(ASR), *resumed, "--resume"]) == 0


def test_non_finite_losses_skip_the_update_without_touching_anything(tmp_path, single_thread):
    """A NaN loss on one batch: no optimizer, schedule or step change; then training goes on."""
    spec = load_spec(ASR, QUIET + ["trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'r'}",
                                   "trainer.eval_every=0", "trainer.max_bad_steps=5"])
    runner = train_module.Run(spec)
    original_forward = runner.model.forward
    calls = {"n": 0}

    def forward(batch):
        out = original_forward(batch)
        calls["n"] += runner.model.training
        if runner.model.training and calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    runner.model.forward = forward
    runner.train()
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "skipped_update"]
    assert len(skipped) == 1 and skipped[0]["step"] == 1 and "loss nan" in skipped[0]["reason"]
    assert _train_steps(tmp_path / "r") == [1, 2, 3]
    final = load_file(tmp_path / "r" / "final" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, single_thread, capsys):
    run_dir = tmp_path / "run"
    overrides = QUIET + ["trainer.save_every=2", "trainer.keep_last=3", f"trainer.output_dir={run_dir}",
                         "trainer.eval_every=0"]
    assert main(["run", str(ASR), *overrides, "trainer.max_steps=5"]) == 0
    newest = run_dir / "checkpoints" / "step-00000005"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a full disk
    assert main(["run", str(ASR), *overrides, "trainer.max_steps=6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "step-00000005" in out and "newest intact checkpoint" in out and "resuming from step-00000004" in out


def test_a_second_job_cannot_write_into_a_run_directory_in_use(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    try:
        spec = load_spec(ASR, [f"trainer.output_dir={tmp_path / 'run'}"])
        with pytest.raises(SpecError, match="in use by pid"):
            train_module.Run(spec)
    finally:
        lock.release()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preempted_carries_the_checkpoint():
    exc = Preempted("stopped", Path("x"))
    assert exc.checkpoint == Path("x") and isinstance(TrainingCollapse("x"), RuntimeError)


@pytest.mark.parametrize("override, message", [
    ("trainer.mixed_precision=fp32", "full precision is 'no'"),
    ("trainer.resume=sometimes", "trainer.resume"),
    ("trainer.max_steps=0", "must be >= 1"),
    ("trainer.keep_last=-1", "must be >= 0"),
])
def test_check_rejects_trainer_values_the_run_would_reject(override, message, capsys):
    assert main(["check", str(ASR), override]) == 2
    assert message in capsys.readouterr().err


def test_check_rejects_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["check", str(ASR), f"trainer.output_dir={tmp_path / 'f'}"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_killing_the_launcher_makes_its_workers_checkpoint_and_stop(tmp_path):
    """SIGKILL to `accelerate launch` (no chance to forward anything): the workers get SIGTERM
    from the kernel (PR_SET_PDEATHSIG), save and exit instead of writing on unsupervised."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "d2v.cli", "run",
           str(ASR), f"trainer.output_dir={out}", "trainer.max_steps=5000", "trainer.eval_every=0",
           "trainer.eval_before_training=false", "trainer.progress_bar=false", "trainer.log_every=1"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline:
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if any(e.get("event") == "preempted" for e in events):
            break
        time.sleep(0.5)
    assert any(e.get("event") == "preempted" for e in events)
    time.sleep(3)
    lock = RunLock(out).acquire()  # the workers are gone: the directory is free again
    lock.release()
    assert list((out / "checkpoints").glob("step-*"))


def test_damaged_init_checkpoints_are_one_clear_error(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["Data2VecAudioForCTC"], "model_type": "data2vec-audio"}')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage" * 10)
    for source in ("bad", "hf"):
        overrides = [f"model.init.checkpoint={tmp_path / source}", f"trainer.output_dir={tmp_path / ('run-' + source)}"]
        assert main(["run", str(ASR), *overrides]) == 2
        err = capsys.readouterr().err
        assert "cannot be read" in err and "Traceback" not in err


def test_an_init_checkpoint_that_mostly_mismatches_needs_an_opt_in(tmp_path, single_thread, capsys):
    common = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.eval_before_training=false",
              "trainer.progress_bar=false"]
    assert main(["run", str(ASR), *common, f"trainer.output_dir={tmp_path / 'small'}", "model.encoder.dim=16",
                 "model.encoder.ffn_dim=32", "model.encoder.heads=2"]) == 0
    wrong = [f"model.init.checkpoint={tmp_path / 'small' / 'final'}", *common]
    assert main(["run", str(ASR), *wrong, f"trainer.output_dir={tmp_path / 'a'}"]) == 2
    assert "fits the model badly" in capsys.readouterr().err
    assert main(["run", str(ASR), *wrong, "model.init.allow_mismatch=true", f"trainer.output_dir={tmp_path / 'b'}"]) == 0


_LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from d2v.train.guards import RunLock
RunLock(Path(sys.argv[1])).acquire()
if os.fork() == 0:  # a data-loader worker: outlives its parent for a while
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_the_run_lock_dies_with_its_process_even_while_forked_workers_live(tmp_path):
    """kill -9 of a trainer whose forked data-loader workers are still alive: the directory is
    free at once, so `--resume` right after a crash is not refused by a dead pid."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpecError, match="in use by pid"):
            RunLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        RunLock(tmp_path).acquire().release()  # the orphaned worker still sleeps, holding nothing
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
