"""FSDP shards every encoder per Transformer block, student and EMA teacher alike, with the one
shipped experiments/accelerate/fsdp.yaml: the model declares its blocks' classes and Accelerate's
own TRANSFORMER_BASED_WRAP policy (the function FSDP2's preparation calls) then picks exactly the
modules ``Encoder.transformer_blocks()`` names, for each modality and for a plugin's encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

from d2v.api import plugins
from d2v.spec.config import load_spec
from d2v.spec.model import build_model
from d2v.nn.layer_options import transformer_blocks
from d2v.train.parallel import declare_fsdp_units

ROOT = Path(__file__).resolve().parents[2]
SPECS = {  # spec -> the block classes it must shard
    "experiments/asr_demo.yaml": ["TransformerBlock"],
    "experiments/sst2_demo.yaml": ["TransformerBlock"],
    "experiments/vision_cls_demo.yaml": ["TransformerBlock"],
    "experiments/pretrain_audio_demo.yaml": ["TransformerBlock"],
    "experiments/pretrain_text_demo.yaml": ["TransformerBlock"],
    "experiments/pretrain2_vision_demo.yaml": ["TransformerBlock"],
    "examples/plugins/d2v-conformer/experiments/pretrain2_conformer_demo.yaml": ["ConformerLayer"],
}


def _shipped_plugin(monkeypatch) -> FullyShardedDataParallelPlugin:
    """The FSDP plugin Accelerate builds from the shipped config (launch sets these variables)."""
    config = yaml.safe_load((ROOT / "experiments" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in config  # one file for every encoder
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(config["fsdp_version"]))
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", config["fsdp_auto_wrap_policy"])
    return FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("spec_path", list(SPECS))
def test_the_shipped_policy_makes_exactly_the_declared_blocks_fsdp_units(spec_path, monkeypatch):
    spec = load_spec(ROOT / spec_path)
    model = build_model(spec["model"], plugins.registry(), spec.get("task", "finetune"))
    assert declare_fsdp_units(model) == SPECS[spec_path]
    policy = fsdp2_prepare_auto_wrap_policy(_shipped_plugin(monkeypatch), model)
    units = {name for name, module in model.named_modules() if name and policy(module)}
    blocks = {name for name, module in model.named_modules() if module in set(transformer_blocks(model))}
    assert units == blocks and blocks
    if spec["task"] == "pretrain":  # the EMA teacher's blocks are units too
        assert any(name.startswith("teacher.") for name in units)
        assert any(not name.startswith("teacher.") for name in units)
