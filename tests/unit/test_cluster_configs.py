"""The cluster launch files are what they claim to be: each shipped accelerate config goes through
`accelerate launch`'s own parsing into the environment the workers get, and from there into the
plugin Accelerate builds in each worker (and, for DeepSpeed, d2v's settings on top); the SLURM
batch script, run under stand-ins for srun, scontrol and accelerate, starts one resuming launcher
per node and on SIGUSR1 stops the trainers before it requeues the job."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, parse_choice_from_env
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.fsdp import CPUOffloadPolicy

from d2v.api.errors import SpecError
from d2v.train.parallel import configure_deepspeed

ROOT = Path(__file__).resolve().parents[2]


def launch(name: str, *options: str):
    """What `accelerate launch --config_file experiments/accelerate/<name>.yaml [options]` does
    before starting its workers: the parsed arguments, the command it would run instead of
    torch's launcher (None: torch's), and the environment the workers get."""
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "experiments" / "accelerate" / f"{name}.yaml"),
                                               *options, "-m", "d2v.cli", "run", "spec.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, None, prepare_multi_gpu_env(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args, *prepare_deepspeed_cmd_env(args)


def launch_environment(name: str) -> dict[str, str]:
    return launch(name)[2]


@pytest.fixture
def worker_env(monkeypatch):
    """Set a launch environment for the test (restored after it)."""
    def apply(env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.setenv(key, value)
        return env
    return apply


@pytest.mark.parametrize("name, kind", [("multinode_ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                        ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    config = load_config_from_file(str(ROOT / "experiments" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind)
    assert config.mixed_precision == "bf16" and config.num_processes >= 8
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("name", ["multinode_ddp", "fsdp", "deepspeed_zero2"])
def test_every_launch_environment_starts_an_accelerator(name, worker_env):
    """What Accelerator.__init__ reads from the launch environment parses (`auto` accumulation
    steps crashed every DeepSpeed worker with int('auto') before the first batch)."""
    worker_env(launch_environment(name))
    assert int(parse_choice_from_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1)) == 1
    assert parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no") == "bf16"


def test_the_fsdp_config_becomes_fsdp2_sharded_per_block(worker_env):
    assert worker_env(launch_environment("fsdp"))["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.auto_wrap_policy is not None  # TRANSFORMER_BASED_WRAP, given the blocks' classes at prepare


def test_the_deepspeed_config_gets_the_spec_settings(worker_env):
    """The shipped ZeRO-2 file leaves accumulation, clipping and precision to the spec: d2v
    writes trainer.grad_accum, trainer.clip_norm (0 = off, where Accelerate would clip at 1.0),
    bf16 as DeepSpeed's torch autocast with fp32 weights, and an integer micro-batch size."""
    assert worker_env(launch_environment("deepspeed_zero2"))["ACCELERATE_USE_DEEPSPEED"] == "true"
    for clip_norm, grad_accum, precision in ((0.0, 1, "bf16"), (5.0, 4, "no")):
        config = DeepSpeedPlugin().deepspeed_config
        assert config["gradient_accumulation_steps"] == "auto" and config["gradient_clipping"] == "auto"
        configure_deepspeed(config, clip_norm=clip_norm, grad_accum=grad_accum, precision=precision, micro_batch=8)
        assert config["gradient_clipping"] == clip_norm and config["gradient_accumulation_steps"] == grad_accum
        assert config["train_micro_batch_size_per_gpu"] == 8 and config["zero_optimization"]["stage"] == 2
        assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
        assert config["torch_autocast"] == {"enabled": precision == "bf16", "dtype": "bfloat16"}


def test_the_deepspeed_config_runs_one_launcher_per_node_as_the_sbatch_script_does():
    """experiments/slurm/pretrain.sbatch starts `accelerate launch` on each node with its rank;
    under DeepSpeed's default multi-node launcher (pdsh) that became `deepspeed --hostfile None`."""
    args, command, _ = launch("deepspeed_zero2", "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
                              "--main_process_ip", "10.0.0.1")
    assert command is None  # torch's launcher, on this node only, as for DDP and FSDP
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")


@pytest.mark.parametrize("change, message", [
    ({"gradient_clipping": 1.0}, "sets gradient_clipping: 1.0 but trainer.clip_norm is 0.0"),
    ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps: 4 but trainer.grad_accum is 1"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 2 only, not stage 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer is not supported"),
    ({"optimizer": {"type": "AdamW"}}, "has a 'optimizer' section"),
    ({"bf16": {"enabled": True}}, "enables bf16 but trainer.mixed_precision resolves to 'no'"),
])
def test_deepspeed_settings_that_contradict_the_spec_stop_at_start(change, message):
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              **change}
    with pytest.raises(SpecError, match=message):
        configure_deepspeed(config, clip_norm=0.0, grad_accum=1, precision="no", micro_batch=1)


def test_deepspeed_refuses_fp16():
    with pytest.raises(SpecError, match="fp16 is not supported under DeepSpeed"):
        configure_deepspeed({"zero_optimization": {"stage": 2}}, clip_norm=0.0, grad_accum=1, precision="fp16",
                            micro_batch=1)


SBATCH = ROOT / "experiments" / "slurm" / "pretrain.sbatch"

# Stand-ins for SLURM and accelerate: each records its arguments in $LOG. srun runs its command
# (one node) and passes SIGTERM on to it, as srun does; the "trainer" (accelerate) waits until it
# gets SIGTERM, then exits 75 as d2v does after writing its checkpoint.
STUBS = {
    # scontrol's stdout to a pipe is buffered: a short host list arrives in one write (cat, not
    # bash's printf, which writes line by line); $MANY_NODES: a list longer than the buffer
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$LOG"
if [ "$1 $2" = "show hostnames" ] && [ -n "${MANY_NODES:-}" ]; then
  echo gpu-a; sleep 0.3; seq -f 'gpu-%g' 2 2000
elif [ "$1 $2" = "show hostnames" ]; then
  cat <<EOF
gpu-a
gpu-b
EOF
fi
""",
    "srun": """#!/bin/bash
echo "srun $1" >> "$LOG"
while [[ $1 == --* ]]; do shift; done
"$@" &
child=$!
trap 'kill -TERM $child' TERM
wait $child; status=$?
if [ $status -gt 128 ]; then wait $child; status=$?; fi
exit $status
""",
    "accelerate": """#!/bin/bash
printf '%s\\n' "$@" > "$WORK/accelerate.args"
trap 'echo "trainer got SIGTERM" >> "$LOG"; exit 75' TERM
if [ -n "$FINISH" ]; then echo "trainer finished" >> "$LOG"; exit 0; fi
touch "$WORK/started"
while true; do sleep 0.05; done
""",
}


def run_sbatch(tmp_path: Path, *, signal_after_start: bool, script: Path = SBATCH,
               **extra_env: str) -> tuple[str, list[str], int]:
    """Run the batch script under the stand-ins as node 1 of a 2-node job 4242 (with SIGUSR1 once
    the trainer runs, as --signal=B:USR1@300 sends it); returns the log, accelerate's arguments and
    the script's exit status."""
    import os
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "WORK": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    env.pop("D2V_ACCELERATE_CONFIG", None)
    env.update(extra_env)
    if not signal_after_start:
        env["FINISH"] = "1"
    proc = subprocess.Popen(["bash", str(script), "experiments/pretrain2_audio_ls960.yaml", "trainer.grad_accum=2"],
                            cwd=tmp_path, env=env, start_new_session=True)
    try:
        if signal_after_start:
            deadline = time.monotonic() + 20
            while not (tmp_path / "started").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the trainer never started"
                time.sleep(0.02)
            proc.send_signal(signal.SIGUSR1)
        status = proc.wait(timeout=20)
    finally:  # whatever is left of the job (a hung script, a trainer nobody stopped) goes
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    args = tmp_path / "accelerate.args"
    return log.read_text(), args.read_text().splitlines() if args.exists() else [], status


def test_sbatch_script_asks_slurm_for_a_warning_signal_and_requeueing():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--signal=B:USR1@300" in directives and "--requeue" in directives


def test_sbatch_script_launches_one_resuming_accelerate_per_node(tmp_path):
    log, args, status = run_sbatch(tmp_path, signal_after_start=False)
    assert status == 0 and log.splitlines() == ["scontrol show hostnames gpu-[a-b]", "srun --kill-on-bad-exit=1",
                                                "trainer finished"]  # no requeue after a finished run
    assert args == ["launch", "--config_file", "experiments/accelerate/multinode_ddp.yaml", "--num_machines", "2",
                    "--num_processes", "16", "--machine_rank", "1", "--main_process_ip", "gpu-a",
                    "--main_process_port", "29500", "-m", "d2v.cli", "run", "experiments/pretrain2_audio_ls960.yaml",
                    "trainer.resume=auto", "trainer.grad_accum=2"]


def test_sbatch_script_on_sigusr1_stops_the_trainers_then_requeues_the_job(tmp_path):
    """SIGUSR1 before the time limit: the trap sends SIGTERM down to the trainers, waits for them
    (they write a checkpoint and exit 75), and only then requeues the job, whose rerun resumes
    (trainer.resume=auto above)."""
    log, args, _ = run_sbatch(tmp_path, signal_after_start=True)
    assert log.splitlines() == ["scontrol show hostnames gpu-[a-b]", "srun --kill-on-bad-exit=1",
                                "trainer got SIGTERM", "scontrol requeue 4242"]
    assert "trainer.resume=auto" in args


def test_sbatch_script_starts_on_a_large_allocation(tmp_path):
    log, args, status = run_sbatch(tmp_path, signal_after_start=False, MANY_NODES="1")
    assert status == 0 and "trainer finished" in log.splitlines()
    assert args[args.index("--main_process_ip") + 1] == "gpu-a"
