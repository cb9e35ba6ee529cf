"""The cluster launch files parse as what they claim to be."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[2]


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


def test_sbatch_script_is_valid_bash_and_resumes_automatically():
    script = ROOT / "experiments" / "slurm" / "pretrain.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "trainer.resume=auto" in text and "--requeue" in text and "--signal=B:USR1" in text
